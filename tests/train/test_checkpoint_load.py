"""load_model builds on the meta device and assigns the file's tensors: the same model as building it at random
and copying the weights in (every parameter and buffer, the non-persistent ones too), without drawing an
initialisation or holding the weights twice."""

import pytest
import torch

from moelab import ModelConfig, build_model, load_preset
from moelab.model.config import MoEConfig, RouterConfig
from moelab.train import checkpoint as ck


def _cfg(router=None, **kw):
    moe = dict(num_experts=4, top_k=2, moe_every=1, expert_hidden=16, num_shared_experts=1)
    moe.update(kw.pop("moe", {}))
    return ModelConfig(vocab_size=61, d_model=16, n_layers=3, n_heads=2, ffn_hidden=24, max_seq_len=32,
                       moe=MoEConfig(router=RouterConfig(**(router or {})), **moe), **kw)


CONFIGS = {
    "tiny-moe": lambda: load_preset("tiny-moe"),
    "tiny-dense": lambda: load_preset("tiny-dense"),
    "tiny-rmoe": lambda: load_preset("tiny-rmoe"),
    "tiny-dsv3": lambda: load_preset("tiny-dsv3"),
    "hash": lambda: _cfg(dict(kind="hash")),
    "random": lambda: _cfg(dict(kind="random")),
    "cosine": lambda: _cfg(dict(kind="cosine", hidden=8)),
    "mlp": lambda: _cfg(dict(kind="mlp", hidden=8)),
    "bias-balance": lambda: _cfg(dict(bias_balance=True)),
    "openmoe-ffn-tied": lambda: _cfg(ffn_kind="openmoe", tie_embeddings=True, moe=dict(dense_layers=[0])),
    "qwen-gate": lambda: _cfg(moe=dict(shared_gate=True, num_shared_experts=2, shared_hidden=8)),
}


def _everything(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _saved(tmp_path, cfg, dtype=None):
    model = build_model(cfg, seed=3)
    with torch.no_grad():
        for m in model.modules():  # a selection bias that moved in training must come back as saved
            if getattr(m, "use_bias", False):
                m.selection_bias_E.copy_(torch.randn(m.selection_bias_E.shape))
    if dtype is not None:
        model = model.to(dtype)
    return ck.save_checkpoint(tmp_path / "ck", model, {"model": cfg.to_dict()}, 0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_meta_build_equals_random_build_and_copy(tmp_path, name):
    cfg = CONFIGS[name]()
    path = _saved(tmp_path, cfg)
    reference = build_model(cfg, seed=11)
    ck.load_weights(reference, path)
    reference.eval()
    rng = torch.random.get_rng_state()
    model = ck.load_model(path)
    assert torch.equal(rng, torch.random.get_rng_state())  # no initialisation drawn
    assert not model.training
    want, got = _everything(reference), _everything(model)
    assert list(got) == list(want)
    for k, t in want.items():
        assert got[k].device.type == "cpu" and got[k].dtype == t.dtype, k
        assert torch.equal(got[k], t), k
    for (k, p), (_, q) in zip(reference.named_parameters(), model.named_parameters()):
        assert p.requires_grad == q.requires_grad, k
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_the_file_s_tensors_become_the_parameters(tmp_path, monkeypatch):
    path = _saved(tmp_path, load_preset("tiny-moe"))
    read = {}
    real = ck.read_weights

    def spy(p):
        read.update(real(p))
        return read

    monkeypatch.setattr(ck, "read_weights", spy)
    model = ck.load_model(path)
    params = dict(model.named_parameters())
    assert params and all(params[k].data_ptr() == read[k].data_ptr() for k in params)  # no second copy


def test_a_bf16_file_loads_into_the_fp32_model_as_a_copy_would(tmp_path):
    cfg = load_preset("tiny-moe")
    path = _saved(tmp_path, cfg, dtype=torch.bfloat16)
    reference = build_model(cfg)
    ck.load_weights(reference, path)
    model = ck.load_model(path)
    for k, t in reference.state_dict().items():
        assert model.state_dict()[k].dtype == t.dtype and torch.equal(model.state_dict()[k], t), k


def test_bench_checkpoint_load_tiny(tmp_path):
    """benchmarks/bench_checkpoint_load.py --tiny runs every variant in its own process and writes its rows."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(root / "benchmarks/bench_checkpoint_load.py"), "--tiny", "--reps", "1",
                          "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["a"], r["b"]) for r in rows] == [("meta", "copy"), ("lazy", "whole"), ("train-meta", "train-random")]
    assert all(r["a_s"] > 0 and r["b_s"] > 0 and set(r["extra"]["peak_gib"]) == {r["a"], r["b"]} for r in rows)
