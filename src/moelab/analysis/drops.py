"""Token dropping: the dropped share by position bucket and by turn, at the trained capacity (the trace's
`dropped` column) or re-simulated from the recorded `expert` / `prob` at any capacity and drop policy.

`simulate_drops` is the drop rule as a pure numpy function on (T x K) ids and probabilities; it never
builds a T x E x C tensor: each choice's place in its expert's queue is its rank within a stable sort by
(group, expert, priority).

Baseline: the queue-only profile. OpenMoE's queue (all rank-0 choices first, tokens in (seq, pos) order)
drops late tokens more even when routing ignores position, so a flat overall share is no baseline. With
`shuffle_positions` the accumulator re-simulates the recorded choices at the same capacity, formula and
policy after shuffling each sequence's chosen sets across its positions (a hash of (seq, pos) orders
them, so any batching gives the same shuffle), and books each drop at the position the set was moved to:
the drop curve the queue alone produces for this load. `queue_comparison` says how much of the observed
rise (last quarter of positions minus the first) the queue explains. Shares carry bootstrap intervals
over sequences (the same folds for the observed and the queue-only profile, so their difference has one).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import numpy as np

from moelab.analysis.common import (
    Result, check_experts, consume, iter_input, layer_choices, regroup, require_columns, seq_block_key,
)
from moelab.analysis.resample import Estimate, estimate, fold_of, mix64
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


def _openmoe_order(bucket_N: np.ndarray, T: int, K: int) -> np.ndarray:
    """np.lexsort((rank-major index, bucket_N)) over the flat choices i = t * K + k: a stable sort by
    bucket of the choices laid out rank-major (j = k * T + t), mapped back to i. Buckets that fit 16 bits
    sort by numpy's radix sort: 20x faster than the lexsort at 8,192 tokens x top-8 of 64."""
    bucket_J = bucket_N.reshape(T, K).T.reshape(-1)
    if bucket_J.max(initial=0) < 1 << 16:
        bucket_J = bucket_J.astype(np.uint16)
    order_J = np.argsort(bucket_J, kind="stable")
    return (order_J % T) * K + order_J // T


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
    if policy == "openmoe":
        order = _openmoe_order(bucket_N, T, K)
    else:
        rank_major_N = (np.arange(K)[None, :] * T + np.arange(T)[:, None]).reshape(-1)  # (rank, token)
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
    overall: float                  # dropped / choices over everything
    overall_L: np.ndarray
    queue_only: bool = False        # positions shuffled within each sequence before the re-simulation
    band_B: np.ndarray | None = None  # 2 x B: 95% bootstrap interval of share_B over sequences (bias-shifted)
    first_quarter: Estimate | None = None  # dropped share in the first quarter of the position buckets
    last_quarter: Estimate | None = None   # ... in the last quarter
    rise: Estimate | None = None           # last - first


def quarter_shares(choices_B: np.ndarray, dropped_B: np.ndarray) -> tuple[float, float]:
    """Dropped share in the first and the last quarter of the position buckets (choice-weighted)."""
    choices_B, dropped_B = np.asarray(choices_B, np.float64), np.asarray(dropped_B, np.float64)
    B = len(choices_B)
    if B == 0 or choices_B.sum() == 0:
        return float("nan"), float("nan")
    q = max(1, B // 4)
    first, last = slice(0, q), slice(B - q, B)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (float(dropped_B[first].sum() / choices_B[first].sum()),
                float(dropped_B[last].sum() / choices_B[last].sum()))


class DropAccumulator:
    """Counts choices and dropped choices per (fold, layer, position bucket) and per turn.

    Without `simulate` it reads the trained `dropped` column and rows need no grouping. With
    `simulate=dict(capacity_factor=..., formula=..., policy=..., group_size=..., batch_seqs=...)` it
    re-runs the drop rule per layer over batches of `batch_seqs` consecutive sequences (seq // batch_seqs):
    feed it batches regrouped by that key (`drop_profile` does). `shuffle_positions` makes it the
    queue-only baseline (see the module note).
    """

    def __init__(self, num_experts: Sequence[int], top_k: int, *, bucket_size: int = 256,
                 simulate: dict[str, Any] | None = None, shuffle_positions: bool = False, folds: int = 1,
                 seed: int = 0):
        self.num_experts, self.top_k, self.bucket_size = list(num_experts), top_k, bucket_size
        self.simulate = None if simulate is None else dict(simulate)
        if self.simulate is not None:
            _check_simulate(self.simulate)
        if shuffle_positions and self.simulate is None:
            raise MoelabError("the queue-only drop baseline needs a capacity setting to re-simulate")
        self.shuffle, self.folds, self.seed = shuffle_positions, folds, seed
        self.columns = ("seq", "pos", "layer", "rank", "expert", "turn") + (
            ("prob",) if self.simulate else ("dropped",))
        L = len(self.num_experts)
        self.choices_FLB = np.zeros((folds, L, 0), np.int64)
        self.dropped_FLB = np.zeros((folds, L, 0), np.int64)
        self.turn_choices = np.zeros(0, np.int64)
        self.turn_dropped = np.zeros(0, np.int64)

    def _grow(self, buckets: int, turns: int) -> None:
        F, L, B = self.choices_FLB.shape
        if buckets > B:
            pad = np.zeros((F, L, buckets - B), np.int64)
            self.choices_FLB = np.concatenate([self.choices_FLB, pad], axis=2)
            self.dropped_FLB = np.concatenate([self.dropped_FLB, pad], axis=2)
        if turns > len(self.turn_choices):
            pad = np.zeros(turns - len(self.turn_choices), np.int64)
            self.turn_choices, self.turn_dropped = np.r_[self.turn_choices, pad], np.r_[self.turn_dropped, pad]

    def _add(self, seq_N: np.ndarray, layer_N: np.ndarray, pos_N: np.ndarray, turn_N: np.ndarray,
             dropped_N: np.ndarray) -> None:
        bucket_N = pos_N.astype(np.int64) // self.bucket_size
        turn_N = turn_N.astype(np.int64)
        self._grow(int(bucket_N.max()) + 1 if len(bucket_N) else 0, int(turn_N.max()) + 1 if len(turn_N) else 0)
        F, L, B = self.choices_FLB.shape
        key = layer_N.astype(np.int64) * B + bucket_N
        if F > 1:
            key = key + L * B * fold_of(seq_N, F)
        self.choices_FLB += np.bincount(key, minlength=F * L * B).reshape(F, L, B)
        self.dropped_FLB += np.bincount(key[dropped_N], minlength=F * L * B).reshape(F, L, B)
        has_turn = turn_N >= 0
        n_turns = len(self.turn_choices)
        self.turn_choices += np.bincount(turn_N[has_turn], minlength=n_turns)
        self.turn_dropped += np.bincount(turn_N[has_turn & dropped_N], minlength=n_turns)

    def update(self, batch: dict[str, np.ndarray]) -> None:
        require_columns(batch, self.columns, "drop profile")
        check_experts(batch, self.num_experts)
        if self.simulate is None:
            self._add(batch["seq"], batch["layer"], batch["pos"], batch["turn"], batch["dropped"].astype(bool))
            return
        s = self.simulate
        for l, E in enumerate(self.num_experts):
            tk = layer_choices(batch, l, self.top_k, ("expert", "prob", "pos", "turn", "seq"), len(self.num_experts))
            if not len(tk["expert"]):
                continue
            ids, prob = tk["expert"], tk["prob"]
            if self.shuffle:  # each sequence's sets in a random order over its own positions
                seq_T = tk["seq"][:, 0].astype(np.int64)
                order = np.lexsort((mix64((seq_T << 32) | tk["pos"][:, 0], self.seed + l), seq_T))
                ids, prob = ids[order], prob[order]
            dropped_TK = simulate_drops(ids, prob, E, s["capacity_factor"], formula=s["formula"],
                                        group_size=s["group_size"], policy=s["policy"],
                                        min_capacity=s["min_capacity"], batch_T=tk["seq"][:, 0] // s["batch_seqs"])
            self._add(tk["seq"].reshape(-1), np.full(dropped_TK.size, l), tk["pos"].reshape(-1),
                      tk["turn"].reshape(-1), dropped_TK.reshape(-1))

    def merge(self, other: "DropAccumulator") -> None:
        """Add the counts of a later part of the stream (parallel.py)."""
        self._grow(other.choices_FLB.shape[2], len(other.turn_choices))
        other._grow(self.choices_FLB.shape[2], len(self.turn_choices))
        for name in ("choices_FLB", "dropped_FLB", "turn_choices", "turn_dropped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def result(self, weights: np.ndarray | None = None, **_: Any) -> DropProfile:
        c, d = self.choices_FLB.sum(axis=0), self.dropped_FLB.sum(axis=0)
        turns = np.flatnonzero(self.turn_choices)
        setting = {"trained": True} if self.simulate is None else dict(self.simulate, trained=False)
        out = DropProfile(
            setting=setting, bucket_size=self.bucket_size, bucket_start=np.arange(c.shape[1]) * self.bucket_size,
            choices_LB=c, dropped_LB=d, share_B=_ratio(d.sum(axis=0), c.sum(axis=0)), share_LB=_ratio(d, c),
            turns=turns, share_by_turn=_ratio(self.turn_dropped[turns], self.turn_choices[turns]),
            overall=float(_ratio(d.sum(), c.sum())), overall_L=_ratio(d.sum(axis=1), c.sum(axis=1)),
            queue_only=self.shuffle,
        )
        # Replicates of (first, last) quarter shares, kept off the dataclass fields (not for metrics.json).
        reps = np.zeros((0, 2))
        if weights is not None and self.folds > 1:
            c_RB = np.einsum("rf,flb->rb", weights, self.choices_FLB)
            d_RB = np.einsum("rf,flb->rb", weights, self.dropped_FLB)
            reps = np.array([quarter_shares(cb, db) for cb, db in zip(c_RB, d_RB)]).reshape(-1, 2)
        out.replicates = reps
        if weights is not None and self.folds > 1:
            with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a bucket no replicate reaches: NaN band
                share_RB = d_RB / c_RB
                bias = np.nanmean(share_RB, axis=0) - out.share_B
                out.band_B = np.nanpercentile(share_RB, [2.5, 97.5], axis=0) - bias
        first, last = quarter_shares(c.sum(axis=0), d.sum(axis=0))
        boot = "95% bootstrap over sequences"
        out.first_quarter = estimate(first, reps[:, 0], interval=boot)
        out.last_quarter = estimate(last, reps[:, 1], interval=boot)
        out.rise = estimate(last - first, reps[:, 1] - reps[:, 0], interval=boot)
        return out


@dataclasses.dataclass
class QueueComparison(Result):
    """Observed drop rise towards the end vs the rise the queue alone produces (positions shuffled)."""

    observed_rise: Estimate   # last-quarter minus first-quarter dropped share, observed
    queue_rise: Estimate      # the same for the queue-only baseline
    excess: Estimate          # observed - queue-only: the part of the rise that depends on what late tokens route to
    explained: float          # queue_rise / observed_rise (NaN when there is no rise)
    share_B: np.ndarray       # observed by position bucket
    queue_share_B: np.ndarray  # queue-only by position bucket
    share_by_turn: np.ndarray
    queue_share_by_turn: np.ndarray


def queue_comparison(observed: DropProfile, queue: DropProfile) -> QueueComparison:
    """How much of the late-position excess of drops the queue explains (same folds, paired replicates)."""
    a, b = getattr(observed, "replicates", np.zeros((0, 2))), getattr(queue, "replicates", np.zeros((0, 2)))
    paired = a[:, 1] - a[:, 0] - (b[:, 1] - b[:, 0]) if len(a) == len(b) and len(a) else None
    obs, q = observed.rise.value, queue.rise.value
    excess = estimate(obs - q, paired, interval="95% bootstrap over sequences (paired)")
    explained = q / obs if obs == obs and abs(obs) > 1e-12 else float("nan")
    turns_q = dict(zip(np.asarray(queue.turns).tolist(), np.asarray(queue.share_by_turn).tolist()))
    return QueueComparison(observed_rise=observed.rise, queue_rise=queue.rise, excess=excess, explained=explained,
                           share_B=observed.share_B, queue_share_B=_pad(queue.share_B, len(observed.share_B)),
                           share_by_turn=observed.share_by_turn,
                           queue_share_by_turn=np.array([turns_q.get(t, np.nan) for t in np.asarray(observed.turns)]))


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return np.r_[a, np.full(max(0, n - len(a)), np.nan)][:n]


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
                 simulate: dict[str, Any] | None = None, shuffle_positions: bool = False,
                 batch_rows: int = 1 << 20) -> DropProfile:
    """Dropped share by position bucket and turn, trained (`dropped`) or re-simulated (`simulate`, with
    `shuffle_positions` the queue-only baseline)."""
    acc = DropAccumulator(num_experts, top_k, bucket_size=bucket_size, simulate=simulate,
                          shuffle_positions=shuffle_positions)
    batches = iter_input(trace_like, acc.columns, batch_rows)
    if acc.simulate is not None:
        batches = regroup(batches, seq_block_key(acc.simulate["batch_seqs"]))
    consume(batches, [acc])
    return acc.result()
