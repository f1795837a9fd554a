import math

import pytest
import torch

from moelab.model.capacity import drop_mask, expert_capacity


def naive_drop_mask(expert_ids_TK, scores_TK, num_experts, capacity_factor, *, formula="topk",
                    group_size=4096, min_capacity=4, policy="openmoe"):
    """The drop rule as a plain loop over queued choices: the oracle for the sorted fast path."""
    T, K = expert_ids_TK.shape
    dropped = torch.zeros(T, K, dtype=torch.bool)
    if capacity_factor is None:
        return dropped
    if formula == "group":
        cap, G = max(round(capacity_factor * group_size / num_experts), min_capacity), group_size
    else:
        raw = math.floor(K * capacity_factor * T / num_experts)
        cap, G = max(raw + raw % 2, min_capacity), T
    ids, scores = expert_ids_TK.tolist(), scores_TK.tolist()
    for g0 in range(0, T, G):
        toks = range(g0, min(g0 + G, T))
        choices = [(k, t) for k in range(K) for t in toks]
        if policy == "score":
            choices.sort(key=lambda kt: -scores[kt[1]][kt[0]])  # stable: ties keep (rank, token)
        used = [0] * num_experts
        for k, t in choices:
            e = ids[t][k]
            if used[e] >= cap:
                dropped[t, k] = True
            else:
                used[e] += 1
    return dropped


def test_reference_vectors(vectors):
    for case in vectors["routing"]:
        exp = case["expected"]
        ids = torch.tensor(exp["expert_ids_TK"])
        probs = torch.tensor(exp["probs_TE"], dtype=torch.float64)
        scores = probs.gather(1, ids)
        kw = dict(formula=case["capacity_formula"], policy=case["drop_policy"],
                  group_size=case["group_size"] or 4096)
        got = drop_mask(ids, scores, case["E"], case["capacity_factor"], **kw)
        assert got.tolist() == exp["dropped_TK"], case
        assert int(got.sum()) == exp["n_dropped"]
        assert naive_drop_mask(ids, scores, case["E"], case["capacity_factor"], **kw).tolist() == exp["dropped_TK"]
        T = case["T"]
        n = case["group_size"] or T
        cap = expert_capacity(n if case["capacity_formula"] == "topk" else T, case["E"], case["k"],
                              case["capacity_factor"], case["capacity_formula"], case["group_size"] or 4096)
        assert cap == case["capacity_per_group"][0]


@pytest.mark.parametrize("args, expected", [
    ((12, 4, 2, 1.0, "topk"), 6),      # 2 * 12 / 4 = 6
    ((24, 8, 3, 1.0, "topk"), 10),     # floor(9) is odd -> 10
    ((100, 16, 2, 1.25, "topk"), 16),  # floor(15.625) = 15 -> 16
    ((4, 4, 1, 1.0, "topk"), 4),       # 1, raised to the floor of 4
    ((0, 4, 2, 1.25, "group", 8), 4),      # round(2.5) = 2 (half to even), raised to 4
])
def test_capacity_formulas_by_hand(args, expected):
    assert expert_capacity(*args) == expected


def test_group_capacity_by_hand():
    assert expert_capacity(10, 16, 2, 1.25, "group", group_size=4096) == 320  # round(1.25 * 4096 / 16)
    assert expert_capacity(10, 32, 2, 2.0, "group", group_size=8192) == 512


def test_openmoe_order_hand_made():
    # 4 tokens all choosing expert 0 first and expert 1 second; capacity 4 slots per expert (minimum).
    # With E=2, k=2, cf=0.5: floor(2*0.5*4/2) = 2 -> raised to min 4 -> nothing drops.
    ids = torch.tensor([[0, 1]] * 4)
    scores = torch.tensor([[0.6, 0.4]] * 4)
    assert not drop_mask(ids, scores, 2, 0.5).any()
    # min_capacity 1 and cf 0.5 gives capacity 2: tokens 0, 1 keep rank 0; tokens 0, 1 keep rank 1.
    got = drop_mask(ids, scores, 2, 0.5, min_capacity=1)
    assert got.tolist() == [[False, False], [False, False], [True, True], [True, True]]


def test_rank0_choices_queue_before_rank1():
    # Token 0's second choice is expert 1; tokens 1..2 choose expert 1 first. Capacity 2.
    ids = torch.tensor([[0, 1], [1, 0], [1, 2]])
    scores = torch.tensor([[0.9, 0.1], [0.5, 0.4], [0.5, 0.4]])
    got = drop_mask(ids, scores, 3, 1.0, formula="topk", min_capacity=2)  # floor(2*3/3)=2
    # expert 1 queue: (t1, rank0), (t2, rank0), (t0, rank1) -> t0's rank-1 choice drops
    assert got.tolist() == [[False, True], [False, False], [False, False]]


def test_score_policy_prefers_confident_choices():
    ids = torch.tensor([[0, 1], [1, 0], [1, 2]])
    scores = torch.tensor([[0.5, 0.45], [0.3, 0.2], [0.35, 0.3]])
    got = drop_mask(ids, scores, 3, 1.0, min_capacity=2, policy="score")
    # expert 1 candidates by score: t0 rank1 (0.45), t2 (0.35), t1 (0.3) -> t1 drops its rank-0 choice
    assert got.tolist() == [[False, False], [True, False], [False, False]]


def test_dropless_and_empty():
    ids = torch.randint(0, 4, (10, 2))
    assert not drop_mask(ids, torch.rand(10, 2), 4, None).any()
    assert drop_mask(ids[:0], torch.rand(0, 2), 4, 1.0).shape == (0, 2)


@pytest.mark.parametrize("policy", ["openmoe", "score"])
@pytest.mark.parametrize("formula, group", [("topk", None), ("group", 16), ("group", 7)])
@pytest.mark.parametrize("k", [1, 2, 6])
def test_fast_path_matches_naive_loop(policy, formula, group, k):
    g = torch.Generator().manual_seed(k * 7 + len(policy))
    E, T = 8, 61
    logits = torch.randn(T, E, generator=g) * 2
    logits[:, 0] += 1.5  # an over-popular expert so that drops happen
    probs = logits.softmax(-1)
    scores, ids = probs.topk(k, dim=-1)
    n_dropped = 0
    for cf in (0.5, 1.0, 1.25):
        kw = dict(formula=formula, group_size=group or 4096, policy=policy, min_capacity=1)
        fast = drop_mask(ids, scores, E, cf, **kw)
        assert torch.equal(fast, naive_drop_mask(ids, scores, E, cf, **kw))
        n_dropped += int(fast.sum())
    assert n_dropped > 0
