"""closer-dense-reference on tiny random models (no training): an upcycled MoE's experts are the dense FFN
(similarity 1 at every layer, no trend); experts pushed away from it more in deeper layers give a rising
departure; the same push at every layer gives none."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moelab.claims.registry import all_rows
from moelab.claims.rows_denseref import MARGIN, angular, dense_reference_similarity, departure_trend, expert_outputs
from moelab.claims.seeds import t_interval
from moelab.model.config import ModelConfig
from moelab.model.transformer import build_model
from moelab.model.upcycle import UpcycleConfig, upcycle_state_dict, upcycled_config
from moelab.presets import load_preset_dict

L, E = 6, 4


def pair(seed: int):
    d = load_preset_dict("tiny-dense", ["model.n_layers=6", "model.d_model=16", "model.n_heads=2",
                                        "model.ffn_hidden=16", "model.vocab_size=64", "model.max_seq_len=32"])
    dense = build_model(ModelConfig.from_dict(d["model"], path="model"), seed=seed).eval()
    moe_table = load_preset_dict("tiny-moe", [f"model.moe.num_experts={E}", "model.moe.moe_every=1",
                                              "model.moe.num_shared_experts=0", "model.moe.shared_placement=none",
                                              "model.moe.capacity_factor_train=none",
                                              "model.moe.capacity_factor_eval=none"])["model"]["moe"]
    opts = UpcycleConfig()
    cfg = upcycled_config(dense.config, moe_table, opts)
    moe = build_model(cfg, seed=seed)
    moe.load_state_dict(upcycle_state_dict(dense.state_dict(), dense.config, cfg, opts, moe.state_dict()))
    return moe.eval(), dense


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(seed))


def push(moe, scale_L, seed: int) -> None:
    """Add noise to every expert's weights, `scale_L[l]` times each matrix's std, at MoE layer l."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for l, layer in enumerate(moe.moe_layers()):
            for w in (layer.experts.w_in_EDX, layer.experts.w_out_EFD):
                w += scale_L[l] * w.std() * torch.randn(w.shape, generator=g)


def test_upcycled_experts_are_the_dense_ffn():
    moe, dense = pair(0)
    to_dense, between = dense_reference_similarity(moe, dense, ids(0))
    assert to_dense.shape == (L, 4 * 32) and between.shape == (L, 4 * 32)
    assert np.allclose(to_dense, 1.0, atol=1e-6) and np.allclose(between, 1.0, atol=1e-6)
    assert math.isnan(departure_trend(to_dense.mean(1)))  # a constant profile has no trend


def test_expert_outputs_match_the_dense_ffn_and_angular_by_hand():
    moe, dense = pair(1)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    layer = moe.moe_layers()[2]
    y = expert_outputs(layer, x)
    assert torch.allclose(y[:, 3], dense.blocks[layer.layer].ffn(x), atol=1e-6)
    a, b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 2.0], [-3.0, 0.0]])
    assert angular(a, b).tolist() == pytest.approx([0.75, 0.5, 0.0])


def test_departure_growing_with_depth_is_found():
    trends = []
    for seed in range(3):
        moe, dense = pair(seed)
        push(moe, np.linspace(0.1, 1.5, L), seed)
        trends.append(departure_trend(dense_reference_similarity(moe, dense, ids(seed))[0].mean(1)))
    mean, lo, hi = t_interval(trends)
    assert lo > MARGIN and mean > 0.9


def test_the_same_push_at_every_layer_has_no_trend():
    trends = []
    for seed in range(3):
        moe, dense = pair(10 + seed)
        push(moe, np.full(L, 0.8), 10 + seed)
        to_dense = dense_reference_similarity(moe, dense, ids(seed))[0].mean(1)
        assert (to_dense < 0.95).all()  # the experts did move away from the dense FFN
        trends.append(departure_trend(to_dense))
    mean, lo, hi = t_interval(trends)
    assert hi < MARGIN or lo < 0 < hi


def test_registered():
    assert all_rows()["closer-dense-reference"].paper == "A Closer Look"


def test_upcycled_init_rebuilds_when_the_moe_preset_changes_and_tokens_are_cut(ws, monkeypatch):
    """The upcycled checkpoints' cache keys (this row's and the upcycle row's) held the dense run's key and the
    preset's name only: an edited tiny-moe preset (or upcycling code) served the old checkpoint. And the caption's token count is the
    count averaged: a batch that passes it is cut, not averaged whole."""
    import json

    from moelab.claims import rows_denseref as rd
    from moelab.claims import rows_upcycle as ru
    from moelab.claims import workspace as wsm

    p = rd.upcycled_pair(ws, 0)
    up_dense = ws.run("up-dense-s0", ru.DENSE_PRESET, seed=0, steps=2)
    ru.upcycled_init(ws, up_dense, 0)  # the upcycle row's checkpoint, by the same rule
    inits = [ws.root / "upcycled" / "denseref8-init-s0", ws.root / "upcycled" / "up-init-s0"]
    keys = [json.loads((i / wsm.STAMP).read_text())["key"] for i in inits]
    real = wsm.preset_contents
    monkeypatch.setattr(wsm, "preset_contents", lambda name: {**real(name), "edited": name == "tiny-moe"})
    rd.upcycled_pair(ws, 0)
    ru.upcycled_init(ws, up_dense, 0)
    assert all(json.loads((i / wsm.STAMP).read_text())["key"] != k for i, k in zip(inits, keys))
    monkeypatch.undo()

    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.train.checkpoint import load_model

    moe, dense = load_model(rd.final(p["moe"])).eval(), load_model(rd.final(p["dense"])).eval()
    batch = next(iter(iter_sequential(load_corpus(ws.corpus()), seq_len=ws.scale.seq_len,
                                      batch_size=ws.scale.batch_size, split="heldout")))
    n = batch["input_ids"].numel() - 7  # inside the first batch
    to_dense, between = dense_reference_similarity(moe, dense, batch["input_ids"])
    got = rd.measure_seed(ws, p, n)
    assert np.allclose(got[0], to_dense[:, :n].mean(1)) and np.allclose(got[1], between[:, :n].mean(1))
    assert not np.allclose(got[0], to_dense.mean(1))  # the whole batch is another number
