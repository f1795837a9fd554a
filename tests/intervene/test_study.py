"""Ablation and sweeps over batches: cached halves equal the whole forward; planted 'nothing' and 'something'."""

import numpy as np
import pytest
import torch

from moelab.intervene.edit import RoutingEdit, edit_routing
from moelab.intervene.runner import ablation_losses, k_cosines, prefix, suffix, token_loss
from moelab.intervene.study import (ablation_results, capacity_edits, run_ablation, run_sweep, take_batches,
                                    topk_edits)
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.transformer import build_model

NAMES = {"domain": ["web", "code"], "lang": ["en"]}


def tiny(kind="linear", **moe):
    base = dict(num_experts=4, top_k=2, moe_every=1, expert_hidden=16, capacity_factor_eval=None)
    base.update(moe)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, ffn_hidden=32, max_seq_len=32,
                      moe=MoEConfig(router=RouterConfig(kind=kind, hidden=8), **base))
    return build_model(cfg, seed=0).eval()


def batches(n=3, B=4, S=12, vocab=range(40), seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = torch.tensor(list(vocab))
    for _ in range(n):
        ids = vocab[torch.randint(0, len(vocab), (B, S), generator=g)]
        labels = ids.clone()
        labels[-1, -2:] = -100
        doc = torch.zeros(B, S, dtype=torch.long)
        doc[-1, -2:] = -1
        dom = (torch.arange(B) % 2).repeat_interleave(S).view(B, S).to(torch.int16)
        yield {"input_ids": ids, "labels": labels, "doc": doc, "domain_id": dom,
               "lang_id": torch.zeros(B, S, dtype=torch.int16)}


def test_prefix_then_suffix_is_the_whole_forward():
    for kind in ("linear", "rmoe"):
        model = tiny(kind, capacity_factor_eval=1.0)
        ids = next(batches())["input_ids"]
        whole = model(ids, capacity_factor=1.0).logits
        for first in range(4):
            assert torch.equal(suffix(model, prefix(model, ids, first, 1.0), 1.0), whole)


def test_cached_ablation_equals_whole_model_ablation():
    model = tiny("rmoe")
    b = next(batches())
    targets = [(1, (0,)), (1, (2, 3)), (2, (1,)), (0, (3,))]  # the last one goes back down
    base, fast = ablation_losses(model, b["input_ids"], b["labels"], targets, None, reuse=True)
    _, slow = ablation_losses(model, b["input_ids"], b["labels"], targets, None, reuse=False)
    for (block, experts), f, s in zip(targets, fast, slow):
        with edit_routing(model, {block: RoutingEdit(mask=experts)}):
            ref = token_loss(model(b["input_ids"]).logits, b["labels"])
        torch.testing.assert_close(f, ref, rtol=0, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(s, ref, rtol=0, atol=1e-6, equal_nan=True)
    assert torch.isnan(base[-1, -2:]).all() and not torch.isnan(base[:-1]).any()


def test_ablating_an_expert_no_token_reaches_changes_nothing_and_a_used_one_changes_the_loss():
    model = tiny("hash")
    table = model.blocks[1].moe.router.table_VK
    unused = [v for v in range(40) if 3 not in table[v].tolist()]  # tokens that never route to expert 3
    data = take_batches(batches(vocab=unused), 10_000)
    targets = [(1, (3,)), (1, (int(table[unused[0], 0]),))]
    tokens, base, deltas = run_ablation(model, data, targets, None)
    assert len(base) == 3 * (4 * 11 - 2)  # two ignored labels per batch
    rows = ablation_results(tokens, deltas, targets, NAMES, n_boot=200)
    assert np.all(deltas[0] == 0) and rows[0]["all"]["p"] == 1.0
    assert rows[0]["all"]["lo"] == rows[0]["all"]["hi"] == 0.0
    assert np.any(deltas[1] != 0) and rows[1]["all"]["lo"] <= rows[1]["all"]["mean"] <= rows[1]["all"]["hi"]
    assert set(rows[1]["domain"]) == {"web", "code"} and rows[1]["all"]["p_holm"] >= rows[1]["all"]["p"]


def test_take_batches_stops_at_the_token_count():
    data = take_batches(batches(n=5), 50)
    assert sum(int((b["labels"][:, 1:] != -100).sum()) for b in data) == 50 and len(data) == 2


def test_sweeps_hold_the_models_own_setting_at_zero_delta():
    model = tiny(capacity_factor_eval=2.0)
    data = take_batches(batches(), 10_000)
    out = run_sweep(model, data, {**topk_edits(4), **capacity_edits([2.0, 0.5], ["openmoe"])}, 2.0, NAMES,
                    n_boot=100)
    assert out["k=2"]["delta"]["all"]["mean"] == 0.0 and out["k=2"]["loss"] == out["none"]["loss"]
    assert out["cf=2.0,openmoe"]["delta"]["all"]["mean"] == 0.0
    assert out["k=1"]["delta"]["all"]["mean"] != 0.0 and out["cf=0.5,openmoe"]["dropped"] > 0.0
    b = data[0]
    cos = k_cosines(model, b["input_ids"], (b["doc"] >= 0).reshape(-1), 2.0)
    assert set(cos) == {0, 1, 2} and all(-1 <= v["k1_vs_own"] < 1 for v in cos.values())


def test_p_value_and_interval_are_for_the_same_token_weighted_mean():
    """Long sequences gain, short ones lose: the token-weighted mean is positive while the mean of
    per-sequence means is negative. The interval is for the token-weighted mean, so the test must be too."""
    import itertools

    from moelab.intervene.study import Tokens, effect_summary

    lengths = [40, 35, 30, 1, 1, 1, 1, 2, 1, 1]  # 10 sequences: 1024 sign patterns, an exact test
    effects = [0.5, 0.5, 0.5, -3.0, -2.0, -2.5, -1.5, -2.0, -3.0, -1.0]
    seq = np.repeat(np.arange(10), lengths)
    values = np.repeat(effects, lengths)
    z = np.zeros(len(seq), np.int64)
    out = effect_summary(Tokens(seq, z, z, z), values, {"domain": ["d"], "lang": ["l"]}, 500, 0)["all"]
    assert out["mean"] == pytest.approx(values.sum() / len(values), abs=1e-12) and out["mean"] > 0
    assert np.mean(effects) < 0  # the other estimand has the other sign
    sums = [e * n for e, n in zip(effects, lengths)]
    obs = abs(sum(sums))
    pats = list(itertools.product((-1.0, 1.0), repeat=10))
    exact = sum(abs(sum(s * v for s, v in zip(p, sums))) >= obs * (1 - 1e-12) for p in pats) / len(pats)
    assert out["p"] == pytest.approx(exact, abs=1e-12)


def test_replay_counts_only_covered_routes_inside_the_cut_and_reports_coverage():
    """Rows 0-1 replayed on their first 6 positions (experts {0, 1} everywhere), the rest not covered, and a
    --tokens cut inside the second batch: the share changed is over covered, kept routes only (a plain
    loop over the model's own routing is the reference)."""
    from moelab.intervene.study import run_replay

    model = tiny()
    data = take_batches(batches(n=3), 70)  # cut inside batch 2
    forced = np.zeros((6, 3, 2), np.int64)
    forced[..., 1] = 1
    replay = {"path": "planted", "seqs": [forced, forced], "blocks": [0, 1, 2]}
    rep = run_replay(model, data, replay, None, NAMES, n_boot=20)
    changed = routes = run = 0
    row = 0
    for batch in data:
        with torch.no_grad():
            own = model(batch["input_ids"], return_routing=True).routing
        B, S = batch["input_ids"].shape
        for r in range(B):
            for t in range(S - 1):
                if batch["labels"][r, t + 1] == -100:
                    continue  # the route feeds no kept prediction
                run += 3
                if row + r >= 2 or t >= 6:
                    continue  # not covered by the replay
                for layer in own:
                    routes += 1
                    changed += sorted(layer.expert_ids_TK[r * S + t].tolist()) != [0, 1]
        row += B
    assert routes == 2 * 6 * 3 and run == 70 * 3
    assert rep["coverage"] == {"routes": routes, "of": run, "share": routes / run}
    assert rep["routes_changed"] == changed / routes and 0 < changed < routes
