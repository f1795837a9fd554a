"""Expert specialisation: E_i(g) tables, OpenMoE's std score, OLMoE's vocabulary and domain
specialisation, expert-label mutual information, and the top tokens of each expert.

A `ShareAccumulator` counts routed choices per (layer, group, expert) for one grouping: a label (domain,
lang), the token ID, the position (or a position bucket), the turn. Choices are counted before dropping,
all ranks (or rank 0 only with `ranks="top1"`). Every score below is a pure function of those tables and
comes with its chance level: uniform random routing at the same group sizes, or shuffled labels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from moelab.analysis.common import (
    KeyCounter, LabelIndex, Result, check_experts, consume, iter_input, require_columns,
)
from moelab.analysis.null import mutual_information as mi_of, normalised_mi, permutation_mi, random_topk_counts
from moelab.config import MoelabError

LABEL_GROUPS = ("domain", "lang")
INT_GROUPS = ("token", "pos", "doc_pos", "turn", "doc", "seq")
GROUPS = LABEL_GROUPS + INT_GROUPS + ("pos_bucket",)


@dataclasses.dataclass
class ShareTables(Result):
    """Per MoE layer l: the group values seen, and counts[l][g, e] = choices of group g routed to e."""

    group: str
    ranks: str  # "all" or "top1"
    num_experts: list[int]
    top_k: int
    groups: list[np.ndarray]
    counts: list[np.ndarray]
    names: list[str] | None = None  # label groups: groups[l] are codes into names
    uniform: list[float] = dataclasses.field(default_factory=list)  # E_i(g) under uniform routing: 1/E

    def __post_init__(self) -> None:
        self.uniform = [1.0 / E for E in self.num_experts]

    @property
    def choices_per_token(self) -> int:
        return self.top_k if self.ranks == "all" else 1

    def tokens(self, layer: int) -> np.ndarray:
        """n(g): (token, layer) pairs of each group (every token contributes k choices, or 1 for top1)."""
        return self.counts[layer].sum(axis=1) // self.choices_per_token

    def share(self, layer: int) -> np.ndarray:
        """E_i(g): share of g's choices that went to expert i (rows sum to 1)."""
        c = self.counts[layer].astype(np.float64)
        return c / np.maximum(c.sum(axis=1, keepdims=True), 1)

    def group_names(self, layer: int) -> list[str]:
        g = self.groups[layer]
        return [self.names[i] for i in g] if self.names is not None else [str(v) for v in g]


class ShareAccumulator:
    """Counts (layer, group, expert) over a stream in a sparse counter: memory ~ distinct triples."""

    def __init__(self, group: str, num_experts: Sequence[int], top_k: int, *, ranks: str = "all",
                 pos_bucket: int = 256):
        if group not in GROUPS:
            raise MoelabError(f"unknown grouping {group!r} (known: {', '.join(GROUPS)})")
        if ranks not in ("all", "top1"):
            raise MoelabError(f"ranks={ranks!r} must be 'all' or 'top1'")
        self.group, self.ranks, self.top_k, self.pos_bucket = group, ranks, top_k, pos_bucket
        self.num_experts = list(num_experts)
        self.counter = KeyCounter()
        self.labels = LabelIndex() if group in LABEL_GROUPS else None
        self.columns = ("layer", "rank", "expert", "pos" if group == "pos_bucket" else group)

    def _values(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        if self.labels is not None:
            return self.labels.encode(batch, self.group)
        if self.group == "pos_bucket":
            return batch["pos"].astype(np.int64) // self.pos_bucket
        return batch[self.group].astype(np.int64)

    def update(self, batch: dict[str, np.ndarray]) -> None:
        require_columns(batch, self.columns, f"specialisation by {self.group}")
        check_experts(batch, self.num_experts)
        values = self._values(batch)
        keep = values >= 0  # turn -1 = no turn: not a group
        if self.ranks == "top1":
            keep &= batch["rank"] == 0
        if values.size and values.max() >= 1 << 32:
            raise MoelabError(f"group {self.group} value {int(values.max())} is too large to count")
        key = (batch["layer"][keep].astype(np.int64) << 48) | (values[keep] << 16) | batch["expert"][keep]
        self.counter.add(key)

    def result(self) -> ShareTables:
        keys, counts = self.counter.result()
        layer_N, value_N, expert_N = keys >> 48, (keys >> 16) & 0xFFFFFFFF, keys & 0xFFFF
        groups, tables = [], []
        for l, E in enumerate(self.num_experts):
            sel = layer_N == l
            g, inv = np.unique(value_N[sel], return_inverse=True)
            flat = np.bincount(inv * E + expert_N[sel], weights=counts[sel], minlength=len(g) * E)
            groups.append(g)
            tables.append(flat.astype(np.int64).reshape(len(g), E))
        names = self.labels.names if self.labels is not None else None
        return ShareTables(group=self.group, ranks=self.ranks, num_experts=self.num_experts,
                           top_k=self.top_k, groups=groups, counts=tables, names=names)


def share_tables(trace_like: Any, group: str, num_experts: Sequence[int], top_k: int, *,
                 ranks: str = "all", pos_bucket: int = 256, batch_rows: int = 1 << 20) -> ShareTables:
    """E_i(g) count tables of a trace for one grouping, in one streaming pass."""
    acc = ShareAccumulator(group, num_experts, top_k, ranks=ranks, pos_bucket=pos_bucket)
    consume(iter_input(trace_like, acc.columns, batch_rows), [acc])
    return acc.result()


# ---- OpenMoE: std over experts of E_i(g) ----------------------------------------------------------
@dataclasses.dataclass
class StdScore(Result):
    group: str
    min_count: int
    groups: list[np.ndarray]  # per layer: groups with n(g) >= min_count
    std: list[np.ndarray]     # per layer: std over experts of E_i(g), numpy ddof=0
    mean: list[float]         # per layer: mean over those groups
    null_mean: list[float]    # same under uniform random routing at the same n(g) (simulated)
    deterministic: list[float]  # ceiling: each group always routed to the same k experts
    mean_over_layers: float
    null_over_layers: float


def std_score(tables: ShareTables, *, min_count: int = 128, null_seed: int = 0) -> StdScore:
    """OpenMoE's context-independent specialisation: 0 for uniform routing, about 0.12 for top-2 of 32."""
    k = tables.choices_per_token
    groups, stds, means, nulls, ceilings = [], [], [], [], []
    for l, E in enumerate(tables.num_experts):
        n_G = tables.tokens(l)
        keep = n_G >= min_count
        std_G = tables.share(l)[keep].std(axis=1)
        sim = random_topk_counts(n_G[keep], E, k, null_seed + l)
        null_G = (sim / np.maximum(sim.sum(axis=1, keepdims=True), 1)).std(axis=1)
        groups.append(tables.groups[l][keep])
        stds.append(std_G)
        means.append(float(std_G.mean()) if keep.any() else float("nan"))
        nulls.append(float(null_G.mean()) if keep.any() else float("nan"))
        ceilings.append(float(np.sqrt(1.0 / (k * E) - 1.0 / E**2)))
    return StdScore(group=tables.group, min_count=min_count, groups=groups, std=stds, mean=means,
                    null_mean=nulls, deterministic=ceilings, mean_over_layers=_nanmean(means),
                    null_over_layers=_nanmean(nulls))


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


# ---- OLMoE: vocabulary and domain specialisation --------------------------------------------------
@dataclasses.dataclass
class VocabSpecialisation(Result):
    min_count: int
    tokens: list[np.ndarray]    # per layer: token IDs with n(v) >= min_count
    per_token: list[np.ndarray]  # max_e count(v, e) / n(v)
    mean: list[float]
    rescaled: list[float]       # (mean - k/E) / (1 - k/E): 0 nominally random, 1 perfect
    null_mean: list[float]      # uniform random routing at the same n(v) (simulated; > k/E for small n)
    null_rescaled: list[float]


def vocab_specialisation(tables: ShareTables, *, min_count: int = 10, null_seed: int = 0) -> VocabSpecialisation:
    """OLMoE: count(v, e) = rows of token v with e in its top-k, n(v) = rows of v; mean of max_e ratio."""
    if tables.group != "token":
        raise MoelabError(f"vocabulary specialisation needs tables grouped by token, not {tables.group}")
    k = tables.choices_per_token
    toks, per, means, resc, nmeans, nresc = [], [], [], [], [], []
    for l, E in enumerate(tables.num_experts):
        n_G = tables.tokens(l)
        keep = n_G >= min_count
        p_G = tables.counts[l][keep].max(axis=1) / np.maximum(n_G[keep], 1)
        sim = random_topk_counts(n_G[keep], E, k, null_seed + l)
        null = float((sim.max(axis=1) / np.maximum(sim.sum(axis=1) // k, 1)).mean()) if keep.any() else float("nan")
        mean = float(p_G.mean()) if keep.any() else float("nan")
        base = k / E
        toks.append(tables.groups[l][keep])
        per.append(p_G)
        means.append(mean)
        nmeans.append(null)
        resc.append((mean - base) / (1 - base) if base < 1 else float("nan"))
        nresc.append((null - base) / (1 - base) if base < 1 else float("nan"))
    return VocabSpecialisation(min_count=min_count, tokens=toks, per_token=per, mean=means, rescaled=resc,
                               null_mean=nmeans, null_rescaled=nresc)


@dataclasses.dataclass
class DomainSpecialisation(Result):
    group: str
    names: list[list[str]]    # per layer: group names
    share: list[np.ndarray]   # per layer G x E: share of g's tokens with e in their top-k
    uniform: list[float]      # k/E: the share every expert gets under uniform routing
    max_share: list[np.ndarray]  # per layer: max over experts, per group


def domain_specialisation(tables: ShareTables) -> DomainSpecialisation:
    """OLMoE: for each group (domain) and expert, the share of the group's tokens routed to the expert."""
    k = tables.choices_per_token
    shares = [tables.share(l) * k for l in range(len(tables.num_experts))]
    return DomainSpecialisation(group=tables.group, names=[tables.group_names(l) for l in range(len(shares))],
                                share=shares, uniform=[k / E for E in tables.num_experts],
                                max_share=[s.max(axis=1) if s.size else np.zeros(0) for s in shares])


# ---- mutual information between expert and label --------------------------------------------------
@dataclasses.dataclass
class ExpertLabelMI(Result):
    group: str
    ranks: str
    mi: list[float]              # nats, per layer
    normalised: list[float]      # MI / sqrt(H(label) H(expert))
    null_mean: list[float]       # shuffled labels: mean MI over permutations
    null_std: list[float]
    null_normalised: list[float]
    n_permutations: int


def expert_label_mi(tables: ShareTables, *, n_permutations: int = 16, seed: int = 0) -> ExpertLabelMI:
    """MI between the expert of a choice and its group label, per layer, with a permutation null."""
    mi, nmi, null_m, null_s, null_n = [], [], [], [], []
    for l in range(len(tables.num_experts)):
        c = tables.counts[l]
        value = mi_of(c) if c.size else float("nan")
        perm = permutation_mi(c, n_permutations, seed + l) if c.size else np.full(1, np.nan)
        mi.append(value)
        nmi.append(normalised_mi(value, c) if c.size else float("nan"))
        null_m.append(float(perm.mean()))
        null_s.append(float(perm.std()))
        null_n.append(normalised_mi(float(perm.mean()), c) if c.size else float("nan"))
    return ExpertLabelMI(group=tables.group, ranks=tables.ranks, mi=mi, normalised=nmi, null_mean=null_m,
                         null_std=null_s, null_normalised=null_n, n_permutations=n_permutations)


# ---- top tokens per expert ------------------------------------------------------------------------
@dataclasses.dataclass
class TopTokens(Result):
    by_count: list[np.ndarray]  # per layer E x n token IDs, most routed first
    counts: list[np.ndarray]    # per layer E x n their counts
    by_lift: list[np.ndarray]   # per layer E x n token IDs (n(v) >= min_count), highest lift first
    lift: list[np.ndarray]      # (count(v,e)/count(e)) / (count(v)/count): 1 = the token's base rate
    null_lift: float = 1.0      # every token at its base rate in every expert


def top_tokens(tables: ShareTables, *, n: int = 10, min_count: int = 10) -> TopTokens:
    """Each expert's most frequent tokens and the tokens most over-represented in it (null lift = 1)."""
    if tables.group != "token":
        raise MoelabError(f"top tokens need tables grouped by token, not {tables.group}")
    ids_c, cnt, ids_l, lifts = [], [], [], []
    for l in range(len(tables.num_experts)):
        c_GE, g = tables.counts[l].astype(np.float64), tables.groups[l]
        top = np.argsort(-c_GE, axis=0, kind="stable")[:n].T
        ids_c.append(g[top])
        cnt.append(np.take_along_axis(c_GE.T, top, axis=1).astype(np.int64))
        rate_G = c_GE.sum(axis=1) / max(c_GE.sum(), 1)
        lift_GE = c_GE / np.maximum(c_GE.sum(axis=0), 1) / np.maximum(rate_G, 1e-300)[:, None]
        lift_GE[tables.tokens(l) < min_count] = -np.inf
        best = np.argsort(-lift_GE, axis=0, kind="stable")[:n].T
        lift_EN = np.take_along_axis(lift_GE.T, best, axis=1)
        ok = np.isfinite(lift_EN)
        ids_l.append(np.where(ok, g[best], -1))
        lifts.append(np.where(ok, lift_EN, np.nan))
    return TopTokens(by_count=ids_c, counts=cnt, by_lift=ids_l, lift=lifts)
