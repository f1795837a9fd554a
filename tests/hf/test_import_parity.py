"""transformers checkpoint -> moelab: same logits, same routing, same balance loss, lossless round trip."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moelab.hf.convert import export_hf, import_hf
from moelab.hf.families import FAMILIES
from moelab.train.checkpoint import load_model

TOL = 1e-4


def _hf_outputs(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids, output_router_logits=True)


def _family_topk(logits_TE, model):
    """The family's own selection: torch.topk of the softmax (what its router module computes)."""
    return torch.topk(torch.softmax(logits_TE.float(), -1), model.config.num_experts_per_tok, dim=-1).indices


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_routing_and_loss_match_transformers(family, converted, make_hf):
    hf = make_hf(family)
    ours = load_model(converted[family])
    ids = torch.randint(0, hf.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    ref = _hf_outputs(hf, ids)
    with torch.no_grad():
        out = ours(ids, labels=ids, return_routing=True)
    diff = (out.logits - ref.logits).abs().max().item()
    print(f"{family}: max |logit difference| = {diff:.2e}")
    assert diff < TOL
    assert len(out.routing) == len(ref.router_logits)
    for rec, logits in zip(out.routing, ref.router_logits):
        assert torch.equal(rec.expert_ids_TK, _family_topk(logits, hf))
    # the raw balance loss is transformers' load_balancing_loss_func (all layers pooled) ...
    torch.testing.assert_close(out.balance_loss, ref.aux_loss, atol=1e-6, rtol=1e-5)
    # ... and the training loss adds it with the same coefficient
    torch.testing.assert_close(out.loss + out.aux_loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_balance_loss_is_transformers_function(converted):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    ours = load_model(converted["qwen3_moe"])
    ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        out = ours(ids, return_routing=True)
    expected = load_balancing_loss_func(tuple(r.logits_TE for r in out.routing), 8, 3)
    torch.testing.assert_close(out.balance_loss, expected, atol=1e-6, rtol=1e-5)


def test_converted_config_maps_family_switches(converted):
    cfgs = {f: json.loads((converted[f] / "config.json").read_text())["model"] for f in FAMILIES}
    assert cfgs["qwen2_moe"]["attn_bias"] == "qkv" and cfgs["qwen2_moe"]["moe"]["shared_gate"]
    assert cfgs["qwen2_moe"]["moe"]["moe_every"] == 2 and cfgs["qwen2_moe"]["moe"]["shared_hidden"] == 36
    assert cfgs["qwen3_moe"]["qk_norm"] == "head" and cfgs["qwen3_moe"]["moe"]["dense_layers"] == [0]
    assert cfgs["qwen3_moe"]["attn_bias"] == "all" and cfgs["qwen3_moe"]["head_dim"] == 16
    assert cfgs["olmoe"]["qk_norm"] == "full" and cfgs["olmoe"]["tie_embeddings"]
    assert cfgs["mixtral"]["moe"]["router"]["renormalize"] and cfgs["mixtral"]["rope_base"] == 1e6
    assert not cfgs["qwen2_moe"]["moe"]["router"]["renormalize"]
    assert all(c["moe"]["balance_loss_scope"] == "global" for c in cfgs.values())


def _tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_gives_back_every_tensor(family, hf_dirs, converted, tmp_path):
    export_hf(converted[family], tmp_path / "back", max_shard_bytes=20_000)  # several shards + an index
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    before, after = _tensors(hf_dirs[family]), _tensors(tmp_path / "back")
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == family


def test_sharded_checkpoint_converts_the_same(tmp_path, converted, make_hf):
    make_hf("qwen2_moe").save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    import_hf(tmp_path / "sharded", tmp_path / "ml")
    a, b = _tensors(tmp_path / "ml"), _tensors(converted["qwen2_moe"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_expert_layout_converts_the_same(family, tmp_path, hf_dirs, converted, make_hf):
    """transformers 5 holds experts as gate_up_proj [E, 2F, D] / down_proj [E, D, F]; read that too."""
    model = make_hf(family)
    folder = tmp_path / "fused"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text((hf_dirs[family] / "config.json").read_text())
    import_hf(folder, tmp_path / "ml")
    a, b = _tensors(tmp_path / "ml"), _tensors(converted[family])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_checkpoint_keeps_its_dtype(tmp_path, make_hf):
    make_hf("mixtral").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    import_hf(tmp_path / "bf16", tmp_path / "ml")
    assert all(t.dtype == torch.bfloat16 for t in _tensors(tmp_path / "ml").values())
    load_model(tmp_path / "ml")  # loads into the fp32 model
