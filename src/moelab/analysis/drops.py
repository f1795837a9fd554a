"""Token dropping: the dropped share by position bucket and by turn, at the trained capacity (the trace's
`dropped` column) or re-simulated from the recorded `expert` / `prob` at any capacity and drop policy.

`simulate_drops` is the drop rule as a pure numpy function on (T x K) ids and probabilities; it never
builds a T x E x C tensor: each choice's place in its expert's queue is its rank within a stable sort by
(group, expert, priority). Baseline for every profile: the overall dropped share (a flat profile means
dropping does not depend on position).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from moelab.analysis.common import (
    Result, check_experts, consume, iter_input, layer_choices, regroup, require_columns, seq_block_key,
)
from moelab.config import MoelabError

FORMULAS = ("topk", "group")
POLICIES = ("openmoe", "score")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, *,
                    formula: str = "topk", group_size: int = 4096, min_capacity: int = 4) -> int:
    """Slots per expert: `topk` floor(k*cf*N/E) rounded up to even over a batch of N tokens;
    `group` round(cf*G/E) per group of G tokens (Python's round: half to even). Both >= min_capacity."""
    if formula == "topk":
        cap = math.floor(top_k * capacity_factor * num_tokens / num_experts)
        cap += cap % 2
    elif formula == "group":
        cap = round(capacity_factor * group_size / num_experts)
    else:
        raise MoelabError(f"capacity formula {formula!r} is unknown (allowed: {', '.join(FORMULAS)})")
    return max(cap, min_capacity)


def _runs(sorted_keys: np.ndarray) -> np.ndarray:
    """Dense run ids 0, 1, ... of a non-decreasing key array."""
    return np.cumsum(np.r_[False, sorted_keys[1:] != sorted_keys[:-1]])


def _group_capacity(T: int, K: int, num_experts: int, capacity_factor: float, formula: str,
                    group_size: int, min_capacity: int, batch_T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group id per token and capacity per group: `topk` one group per batch, `group` G tokens per group."""
    batch_T = _runs(batch_T)
    if formula == "topk":
        size_B = np.bincount(batch_T)
        cap_B = np.floor(K * capacity_factor * size_B / num_experts).astype(np.int64)
        return batch_T, np.maximum(cap_B + cap_B % 2, min_capacity)
    if formula != "group":
        raise MoelabError(f"capacity formula {formula!r} is unknown (allowed: {', '.join(FORMULAS)})")
    first_B = np.searchsorted(batch_T, np.arange(batch_T[-1] + 1 if T else 0))
    group_T = _runs(batch_T * (T + 1) + (np.arange(T) - first_B[batch_T]) // group_size)
    cap = expert_capacity(T, num_experts, K, capacity_factor, formula="group", group_size=group_size,
                          min_capacity=min_capacity)
    return group_T, np.full(int(group_T[-1]) + 1 if T else 0, cap)


def simulate_drops(ids_TK: np.ndarray, probs_TK: np.ndarray, num_experts: int, capacity_factor: float, *,
                   formula: str = "topk", group_size: int = 4096, policy: str = "openmoe",
                   min_capacity: int = 4, batch_T: np.ndarray | None = None) -> np.ndarray:
    """Bool (T x K): True where a choice finds its expert full. Tokens are in (seq, pos) order.

    Queue order within a group and expert: `openmoe` all rank-0 choices before any rank-1, tokens in
    order within a rank; `score` probability descending, ties by (rank, token). `topk` counts capacity
    over each batch (`batch_T`: non-decreasing batch id per token; default one batch); `group` cuts each
    batch into groups of `group_size` tokens (a trailing partial group keeps a full group's capacity).
    """
    ids_TK = np.asarray(ids_TK, dtype=np.int64)
    T, K = ids_TK.shape
    if policy not in POLICIES:
        raise MoelabError(f"drop policy {policy!r} is unknown (allowed: {', '.join(POLICIES)})")
    if T == 0:
        return np.zeros((0, K), dtype=bool)
    batch_T = np.zeros(T, np.int64) if batch_T is None else np.asarray(batch_T, np.int64)
    group_T, cap_G = _group_capacity(T, K, num_experts, capacity_factor, formula, group_size,
                                     min_capacity, batch_T)
    bucket_N = (group_T[:, None] * num_experts + ids_TK).reshape(-1)  # flat choice i = t * K + k
    rank_major_N = (np.arange(K)[None, :] * T + np.arange(T)[:, None]).reshape(-1)  # (rank, token)
    if policy == "openmoe":
        order = np.lexsort((rank_major_N, bucket_N))
    else:
        order = np.lexsort((rank_major_N, -np.asarray(probs_TK, dtype=np.float64).reshape(-1), bucket_N))
    sorted_bucket = bucket_N[order]
    run_start = np.flatnonzero(np.r_[True, sorted_bucket[1:] != sorted_bucket[:-1]])
    run_len = np.diff(np.r_[run_start, len(order)])
    place_sorted = np.arange(len(order)) - np.repeat(run_start, run_len)
    dropped_N = np.empty(T * K, dtype=bool)
    dropped_N[order] = place_sorted >= cap_G[sorted_bucket // num_experts]
    return dropped_N.reshape(T, K)


@dataclasses.dataclass
class DropProfile(Result):
    """Dropped share of choices per MoE layer and overall, by position bucket and by turn."""

    setting: dict[str, Any]         # "trained" or the simulated capacity_factor / formula / policy
    bucket_size: int
    bucket_start: np.ndarray        # first position of each bucket
    choices_LB: np.ndarray          # choices per layer and bucket
    dropped_LB: np.ndarray          # dropped choices per layer and bucket
    share_B: np.ndarray             # all layers together: dropped / choices per bucket
    share_LB: np.ndarray
    turns: np.ndarray               # turn values seen (-1 excluded)
    share_by_turn: np.ndarray
    overall: float                  # the baseline: what a position-independent profile would show
    overall_L: np.ndarray


class DropAccumulator:
    """Counts choices and dropped choices per (layer, position bucket) and per turn.

    Without `simulate` it reads the trained `dropped` column and rows need no grouping. With
    `simulate=dict(capacity_factor=..., formula=..., policy=..., group_size=..., batch_seqs=...)` it
    re-runs the drop rule per layer over batches of `batch_seqs` consecutive sequences (seq // batch_seqs):
    feed it batches regrouped by that key (`drop_profile` does).
    """

    def __init__(self, num_experts: Sequence[int], top_k: int, *, bucket_size: int = 256,
                 simulate: dict[str, Any] | None = None):
        self.num_experts, self.top_k, self.bucket_size = list(num_experts), top_k, bucket_size
        self.simulate = None if simulate is None else dict(simulate)
        if self.simulate is not None:
            _check_simulate(self.simulate)
        self.columns = ("seq", "pos", "layer", "rank", "expert", "turn") + (
            ("prob",) if self.simulate else ("dropped",))
        L = len(self.num_experts)
        self.choices_LB = np.zeros((L, 0), np.int64)
        self.dropped_LB = np.zeros((L, 0), np.int64)
        self.turn_choices = np.zeros(0, np.int64)
        self.turn_dropped = np.zeros(0, np.int64)

    def _grow(self, buckets: int, turns: int) -> None:
        L = len(self.num_experts)
        if buckets > self.choices_LB.shape[1]:
            pad = buckets - self.choices_LB.shape[1]
            self.choices_LB = np.concatenate([self.choices_LB, np.zeros((L, pad), np.int64)], axis=1)
            self.dropped_LB = np.concatenate([self.dropped_LB, np.zeros((L, pad), np.int64)], axis=1)
        if turns > len(self.turn_choices):
            pad = np.zeros(turns - len(self.turn_choices), np.int64)
            self.turn_choices, self.turn_dropped = np.r_[self.turn_choices, pad], np.r_[self.turn_dropped, pad]

    def _add(self, layer_N: np.ndarray, pos_N: np.ndarray, turn_N: np.ndarray, dropped_N: np.ndarray) -> None:
        bucket_N = pos_N.astype(np.int64) // self.bucket_size
        turn_N = turn_N.astype(np.int64)
        self._grow(int(bucket_N.max()) + 1 if len(bucket_N) else 0, int(turn_N.max()) + 1 if len(turn_N) else 0)
        L, B = self.choices_LB.shape
        key = layer_N.astype(np.int64) * B + bucket_N
        self.choices_LB += np.bincount(key, minlength=L * B).reshape(L, B)
        self.dropped_LB += np.bincount(key[dropped_N], minlength=L * B).reshape(L, B)
        has_turn = turn_N >= 0
        n_turns = len(self.turn_choices)
        self.turn_choices += np.bincount(turn_N[has_turn], minlength=n_turns)
        self.turn_dropped += np.bincount(turn_N[has_turn & dropped_N], minlength=n_turns)

    def update(self, batch: dict[str, np.ndarray]) -> None:
        require_columns(batch, self.columns, "drop profile")
        check_experts(batch, self.num_experts)
        if self.simulate is None:
            self._add(batch["layer"], batch["pos"], batch["turn"], batch["dropped"].astype(bool))
            return
        s = self.simulate
        for l, E in enumerate(self.num_experts):
            tk = layer_choices(batch, l, self.top_k, ("expert", "prob", "pos", "turn", "seq"))
            if not len(tk["expert"]):
                continue
            dropped_TK = simulate_drops(tk["expert"], tk["prob"], E, s["capacity_factor"],
                                        formula=s["formula"], group_size=s["group_size"],
                                        policy=s["policy"], min_capacity=s["min_capacity"],
                                        batch_T=tk["seq"][:, 0] // s["batch_seqs"])
            self._add(np.full(dropped_TK.size, l), tk["pos"].reshape(-1), tk["turn"].reshape(-1),
                      dropped_TK.reshape(-1))

    def result(self) -> DropProfile:
        c, d = self.choices_LB, self.dropped_LB
        turns = np.flatnonzero(self.turn_choices)
        setting = {"trained": True} if self.simulate is None else dict(self.simulate, trained=False)
        return DropProfile(
            setting=setting, bucket_size=self.bucket_size, bucket_start=np.arange(c.shape[1]) * self.bucket_size,
            choices_LB=c, dropped_LB=d, share_B=_ratio(d.sum(axis=0), c.sum(axis=0)), share_LB=_ratio(d, c),
            turns=turns, share_by_turn=_ratio(self.turn_dropped[turns], self.turn_choices[turns]),
            overall=float(_ratio(d.sum(), c.sum())), overall_L=_ratio(d.sum(axis=1), c.sum(axis=1)),
        )


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=den > 0)


def _check_simulate(s: dict[str, Any]) -> None:
    s.setdefault("formula", "topk")
    s.setdefault("policy", "openmoe")
    s.setdefault("group_size", 4096)
    s.setdefault("min_capacity", 4)
    unknown = set(s) - {"capacity_factor", "formula", "policy", "group_size", "min_capacity", "batch_seqs"}
    if unknown:
        raise MoelabError(f"unknown drop simulation setting {sorted(unknown)[0]!r}")
    if "capacity_factor" not in s or "batch_seqs" not in s:
        raise MoelabError("drop simulation needs capacity_factor and batch_seqs (the batch size in sequences)")
    if s["formula"] not in FORMULAS or s["policy"] not in POLICIES:
        raise MoelabError(f"drop simulation formula/policy {s['formula']!r}/{s['policy']!r} is unknown")
    if s["batch_seqs"] < 1 or s["capacity_factor"] <= 0:
        raise MoelabError("drop simulation needs batch_seqs >= 1 and capacity_factor > 0")


def drop_profile(trace_like: Any, num_experts: Sequence[int], top_k: int, *, bucket_size: int = 256,
                 simulate: dict[str, Any] | None = None, batch_rows: int = 1 << 20) -> DropProfile:
    """Dropped share by position bucket and turn, trained (`dropped`) or re-simulated (`simulate`)."""
    acc = DropAccumulator(num_experts, top_k, bucket_size=bucket_size, simulate=simulate)
    batches = iter_input(trace_like, acc.columns, batch_rows)
    if acc.simulate is not None:
        batches = regroup(batches, seq_block_key(acc.simulate["batch_seqs"]))
    consume(batches, [acc])
    return acc.result()
