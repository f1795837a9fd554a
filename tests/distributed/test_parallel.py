"""Expert and data parallelism on CPU (gloo) in 2 and 4 local processes match one process to 1e-5.

The world_balance cases compare the global-batch balance loss (parallel.balance_reduce="world") with one
forward over the whole batch; without it (the per-rank loss) they would differ (checked in test_dp2_by_ep2_matches_one).

Why these cases give bit-comparable routing: capacity decisions depend on which tokens share a forward
pass. Dropless routing has none; the `group` formula with group_size = one sequence decides each
sequence on its own, so a rank holding whole rows of the batch decides exactly as one process does on
the whole batch. Those two compare against ONE forward over the global batch (balance loss off: it is a
nonlinear function of the batch's load, so a per-rank balance loss is not the global one). The `topk`
formula sizes capacity from the tokens in the pass, and the balance loss is per pass too, so that case
compares against one process running each rank's shard separately and averaging: the definition of
"routing and dropping on each rank's own tokens, exactly as on one process for those tokens".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the spawned ranks import the bodies by module name
import dist_workers as w  # noqa: E402

S = w.tiny_config(None).max_seq_len
CASES = {
    "dropless": {"model": {"capacity": None}, "per_shard": False},
    "group_capacity": {"model": {"capacity": 1.25, "formula": "group", "group_size": S},
                       "per_shard": False},
    "topk_capacity_balance": {"model": {"capacity": 1.0, "balance_coef": 0.01}, "per_shard": True},
    # parallel.balance_reduce="world" (distributed/balance.py): the balance loss of the global batch, so
    # the reference is ONE forward over it, balance loss on (per layer, and pooled over layers)
    "world_balance": {"model": {"capacity": None, "balance_coef": 0.5}, "per_shard": False,
                      "world_balance": True},
    "world_balance_pooled": {"model": {"capacity": None, "balance_coef": 0.5, "balance_scope": "global"},
                             "per_shard": False, "world_balance": True},
}


def _check(results: list[dict], cases) -> None:
    for rank, r in enumerate(results):
        assert r["ok"], f"rank {rank}: {r['error']}\n{r.get('trace', '')}"
        for case in cases:
            diffs = r[case]
            assert len(diffs) > 10, "too few parameters compared"
            worst = max(diffs, key=diffs.get)
            assert diffs[worst] < 1e-5, f"rank {rank}, {case}: {worst} differs by {diffs[worst]:.2e}"


@pytest.mark.parametrize("dp,ep,mode", [(1, 2, "ddp"), (2, 1, "ddp"), (2, 1, "fsdp")])
def test_two_processes_match_one(tmp_path, dp, ep, mode):
    cases = CASES if mode == "ddp" else {"dropless": CASES["dropless"]}
    _check(w.run_ranks(w.equivalence, dp * ep, tmp_path, dp, ep, cases, mode), cases)


def test_dp2_by_ep2_matches_one(tmp_path):
    # The per-rank balance loss rides along (same spawn): the reason for balance_reduce="world" is that
    # its gradients do NOT match one process on the global batch.
    rank_balance = {"model": {"capacity": None, "balance_coef": 0.5}, "per_shard": False}
    results = w.run_ranks(w.equivalence, 4, tmp_path, 2, 2, {**CASES, "rank_balance": rank_balance})
    _check(results, CASES)
    assert max(max(r["rank_balance"].values()) for r in results) > 1e-4


@pytest.mark.parametrize("how", ["raise", "stall"])
def test_a_failed_rank_makes_the_others_exit(tmp_path, how):
    timeout_s = 3.0
    rank0, rank1 = w.run_ranks(w.dies, 2, tmp_path, timeout_s, how, deadline_s=40)
    assert rank0["ok"], rank0["error"]
    assert rank0["caught"] is not None, "rank 0 passed a barrier its peer never reached"
    assert rank0["caught"].startswith("DistributedError") and "barrier" in rank0["caught"]
    assert rank0["seconds"] < timeout_s + 10
    if how == "raise":
        assert not rank1["ok"] and "failed on purpose" in rank1["error"]

