"""Observational scores against a naive count; rank correlation planted to agree, disagree or be noise;
the pruning curve starts at the model's own loss."""

import numpy as np
import torch

from moelab.intervene.observe import obs_vs_causal, observe, pruning_curve, scores_from
from moelab.intervene.runner import token_loss
from moelab.intervene.study import take_batches
from moelab.intervene.runner import layer_inputs
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.transformer import build_model


def tiny(**moe):
    base = dict(num_experts=4, top_k=2, moe_every=1, expert_hidden=16, capacity_factor_eval=None)
    base.update(moe)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, ffn_hidden=32, max_seq_len=32,
                      moe=MoEConfig(router=RouterConfig(kind="linear"), **base))
    return build_model(cfg, seed=0).eval()


def batches(n=2, B=4, S=12):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(0, 40, (B, S), generator=g)
        labels = ids.clone()
        labels[-1, -2:] = -100
        yield {"input_ids": ids, "labels": labels, "domain_id": torch.zeros(B, S, dtype=torch.int16),
               "lang_id": torch.zeros(B, S, dtype=torch.int16)}


@torch.no_grad()
def test_scores_match_a_naive_pass():
    model = tiny(capacity_factor_eval=1.0)
    data = take_batches(batches(n=2), 10_000)
    sums = observe(model, data, 1.0)
    count_E, weight_E, norm_E = np.zeros(4), np.zeros(4), np.zeros(4)
    experts = model.blocks[1].moe.experts
    for b in data:
        r = model(b["input_ids"], capacity_factor=1.0, return_routing=True).routing[1]
        x_TD = layer_inputs(model, b["input_ids"], 1.0)[1][0]
        valid_T = (b["labels"] != -100).reshape(-1)
        for t in range(len(valid_T)):
            for k in range(2):
                if valid_T[t] and not r.dropped_TK[t, k]:
                    e = int(r.expert_ids_TK[t, k])
                    count_E[e] += 1
                    weight_E[e] += float(r.weights_TK[t, k])
                    norm_E[e] += float(experts.expert_output(x_TD[t:t + 1], e).norm())
    s = scores_from(sums[1])
    np.testing.assert_array_equal(s["frequency"], count_E)
    np.testing.assert_allclose(s["gate_weighted"], weight_E, rtol=1e-5)
    np.testing.assert_allclose(s["activation_norm"], norm_E / count_E, rtol=1e-4)
    assert np.all(s["reap"] <= s["activation_norm"] + 1e-9)  # a weight <= 1 scales each norm down


def test_rank_correlation_planted():
    rng = np.random.default_rng(0)
    S, E, per = 60, 6, 20
    seq_N = np.repeat(np.arange(S), per)
    effect_E = np.arange(E) * 0.1
    deltas_EN = effect_E[:, None] + rng.normal(0, 0.05, (E, S * per))
    sums = np.zeros((4, S, E))
    sums[0] = rng.poisson(10 + 10 * np.arange(E), (S, E))  # frequency grows with the effect
    sums[1] = rng.poisson(10 + 10 * np.arange(E)[::-1], (S, E))  # gate weight shrinks with it
    sums[2] = sums[0] * rng.uniform(0.9, 1.1, (S, E))  # norms: noise around a constant mean
    sums[3] = sums[2] * 0.5
    r = obs_vs_causal(sums, seq_N, deltas_EN, n_boot=200)
    assert r["frequency"]["rho"] == 1.0 and r["frequency"]["lo"] > 0.5
    assert r["gate_weighted"]["rho"] == -1.0 and r["gate_weighted"]["hi"] < -0.5
    assert r["activation_norm"]["lo"] < 0 < r["activation_norm"]["hi"] or abs(r["activation_norm"]["rho"]) < 0.9


@torch.no_grad()
def test_pruning_curve_starts_at_the_models_loss():
    model = tiny()
    data = take_batches(batches(n=2), 10_000)
    curve = pruning_curve(model, data, {0: [3, 2, 1, 0], 1: [0, 1, 2, 3]}, None)
    assert [c["removed_per_layer"] for c in curve] == [0, 1, 2]
    losses = torch.cat([token_loss(model(b["input_ids"]).logits, b["labels"]).reshape(-1) for b in data])
    assert abs(curve[0]["loss"] - float(losses.nanmean())) < 1e-6
    assert curve[2]["loss"] != curve[0]["loss"]
