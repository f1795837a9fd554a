"""Replay from files: a model's own trace (and its engine-style array) reproduces its logits exactly;
a replay from another model is refused in one line."""

import pytest
import torch

from moelab.config import MoelabError
from moelab.intervene.edit import edit_routing
from moelab.intervene.replay import batch_edits, fit_to_model, read_replay_ids
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.transformer import build_model
from moelab.trace.build import trace_batches, trace_meta
from moelab.trace.formats.replay import export_replay

B, S = 3, 10


def tiny(num_experts=4, n_layers=3, moe_every=1):
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=n_layers, n_heads=2, ffn_hidden=32, max_seq_len=32,
                      moe=MoEConfig(router=RouterConfig(kind="linear"), num_experts=num_experts, top_k=2,
                                    moe_every=moe_every, expert_hidden=16, capacity_factor_eval=None))
    return build_model(cfg, seed=0).eval()


def batch():
    ids = torch.randint(0, 40, (B, S), generator=torch.Generator().manual_seed(4))
    return {"input_ids": ids, "labels": ids, "doc": torch.arange(B).repeat_interleave(S).view(B, S),
            "pos": torch.arange(S).repeat(B, 1), "domain_id": torch.zeros(B, S, dtype=torch.int16),
            "lang_id": torch.zeros(B, S, dtype=torch.int16), "turn": torch.full((B, S), -1, dtype=torch.int16)}


def own_trace(model, path):
    meta = trace_meta(model, None, 0, None, "moelab", ["web"], ["en"])
    trace_batches(model, [batch()], path, meta, max_tokens=10_000, capacity_factor=None)
    return path


def replayed_logits(model, path):
    seqs, blocks = fit_to_model(*read_replay_ids(path), model, str(path))
    with edit_routing(model, batch_edits(seqs, 0, B, S, blocks)):
        return model(batch()["input_ids"], capacity_factor=None).logits


@pytest.mark.parametrize("form", ["parquet", "npy_without_last", "safetensors"])
def test_replay_of_own_trace_reproduces_logits(tmp_path, form):
    model = tiny()
    path = own_trace(model, tmp_path / "t.parquet")
    if form != "parquet":
        out = tmp_path / ("r.npy" if form.startswith("npy") else "r.safetensors")
        export_replay(path, out, drop_last=form == "npy_without_last")
        path = out
    other = tiny()
    torch.nn.init.normal_(other.blocks[1].moe.router.weight_ED, 0, 0.5)  # routes differently by itself
    ref = model(batch()["input_ids"], capacity_factor=None, return_routing=True)
    free = other(batch()["input_ids"], capacity_factor=None, return_routing=True)
    assert not torch.equal(free.routing[1].expert_ids_TK, ref.routing[1].expert_ids_TK)
    assert torch.equal(replayed_logits(model, path), ref.logits)
    with torch.no_grad():  # the other model replaying model's routing takes model's expert choices
        seqs, blocks = fit_to_model(*read_replay_ids(path), other, "r")
        with edit_routing(other, batch_edits(seqs, 0, B, S, blocks)):
            forced = other(batch()["input_ids"], capacity_factor=None, return_routing=True)
    same = forced.routing[1].expert_ids_TK == ref.routing[1].expert_ids_TK
    if form == "npy_without_last":  # each sequence's last token routes normally
        assert same.view(B, S, 2)[:, :-1].all()
    else:
        assert same.all()


@pytest.mark.parametrize("kw,msg", [({"num_experts": 2}, "uses expert"), ({"n_layers": 2}, "2 MoE layers"),
                                    ({"moe_every": 2, "n_layers": 6}, "blocks")])
def test_replay_from_another_model_is_refused(tmp_path, kw, msg):
    path = own_trace(tiny(), tmp_path / "t.parquet")
    with pytest.raises(MoelabError, match=msg):
        fit_to_model(*read_replay_ids(path), tiny(**kw), str(path))
