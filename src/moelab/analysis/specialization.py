"""Expert specialisation: E_i(g) tables, OpenMoE's std score, OLMoE's vocabulary and domain
specialisation, expert-label mutual information, and the top tokens of each expert.

A `ShareAccumulator` counts routed choices per (layer, group, expert) for one grouping: a label (domain,
lang), the token ID, the position (or a position bucket), the turn. Choices are counted before dropping,
all ranks (or rank 0 only with `ranks="top1"`). Every score below is a pure function of those tables and
comes with its chance level: uniform random routing at the same group sizes, or shuffled labels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from moelab.analysis.common import (
    KeyCounter, LabelIndex, Result, check_experts, consume, iter_input, require_columns,
)
from moelab.analysis.null import mutual_information as mi_of, normalised_mi, permutation_mi, random_topk_counts
from moelab.analysis.resample import FOLDS, Estimate, SetPool, fold_of, group_null, layer_estimates, mix64
from moelab.config import MoelabError

LABEL_GROUPS = ("domain", "lang")
INT_GROUPS = ("token", "pos", "doc_pos", "turn", "doc", "seq")
GROUPS = LABEL_GROUPS + INT_GROUPS + ("pos_bucket",)
DENSE_GROUPS = 1 << 17  # group values below this may count in a dense table ...
DENSE_BUDGET = 1 << 26  # ... of at most this many cells (256 MiB of int32)


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

    def replicate_tables(self, layer: int, weights_RF: np.ndarray | None, keep_G: np.ndarray) -> Iterator[np.ndarray]:
        """Bootstrap replicates of counts[layer][keep_G]: one fold-weighted G' x E table per row of weights."""
        if weights_RF is None or getattr(self, "folds", 1) <= 1:
            return
        fold, g, e, c = self.fold_entries[layer]
        keep_G = keep_G & self.sampled[layer]
        index_G = np.full(len(self.groups[layer]), -1)
        index_G[np.flatnonzero(keep_G)] = np.arange(int(np.sum(keep_G)))
        m = index_G[g] >= 0
        E, G = self.num_experts[layer], int(np.sum(keep_G))
        key, fold, c = index_G[g[m]] * E + e[m], fold[m], c[m].astype(np.float64)
        for w_F in weights_RF:
            yield np.bincount(key, weights=w_F[fold] * c, minlength=G * E).reshape(G, E)

    def group_names(self, layer: int) -> list[str]:
        g = self.groups[layer]
        return [self.names[i] for i in g] if self.names is not None else [str(v) for v in g]


class ShareAccumulator:
    """Counts (fold, layer, group, expert) over a stream in a sparse counter: memory ~ distinct keys.

    The fold (a hash of the row's sequence, `resample.fold_of`) keeps the counts split for the bootstrap;
    `folds=1` counts without it. With `fold_sample` n > 1 only the groups whose hash is 0 mod n are split
    (the others count under one extra fold): split counts of a large vocabulary take one key per choice,
    which a 100M-row trace cannot afford, so the intervals come from that sample of groups (see
    `_resampled`)."""

    def __init__(self, group: str, num_experts: Sequence[int], top_k: int, *, ranks: str = "all",
                 pos_bucket: int = 256, folds: int = FOLDS, seed: int = 0, fold_sample: int = 1):
        if group not in GROUPS:
            raise MoelabError(f"unknown grouping {group!r} (known: {', '.join(GROUPS)})")
        if ranks not in ("all", "top1"):
            raise MoelabError(f"ranks={ranks!r} must be 'all' or 'top1'")
        self.group, self.ranks, self.top_k, self.pos_bucket = group, ranks, top_k, pos_bucket
        self.num_experts = list(num_experts)
        self.folds, self.seed, self.fold_sample = folds, seed, max(1, fold_sample)
        if (folds + 1) * len(self.num_experts) >= 1 << 15:
            raise MoelabError(f"{folds} bootstrap folds x {len(self.num_experts)} layers is too many to count")
        self.counter = KeyCounter()
        self.dense: dict[str, np.ndarray] = {}  # "split" / "unsplit": slot x group value x expert counts
        self.dense_rows = 0
        self.labels = LabelIndex() if group in LABEL_GROUPS else None
        self.columns = ("seq", "layer", "rank", "expert", "pos" if group == "pos_bucket" else group)

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
        layer, values, expert = batch["layer"][keep].astype(np.int64), values[keep], batch["expert"][keep]
        fold = np.zeros(len(layer), np.int64)
        if self.folds > 1:
            fold = fold_of(batch["seq"], self.folds, self.seed)[keep]
            if self.fold_sample > 1:
                fold[~self._sampled(values)] = self.folds
        slot = layer + len(self.num_experts) * fold
        sparse = np.ones(len(layer), bool)
        for name, rows in (("unsplit", fold >= self.folds if self.folds > 1 else np.ones(len(layer), bool)),
                           ("split", fold < self.folds if self.folds > 1 else np.zeros(len(layer), bool))):
            rows = rows & (values < DENSE_GROUPS)
            if rows.any() and self._add_dense(name, slot[rows] if name == "split" else layer[rows], values[rows],
                                              expert[rows]):
                sparse &= ~rows
        self.counter.add((slot[sparse] << 48) | (values[sparse] << 16) | expert[sparse])

    def _add_dense(self, name: str, slot: np.ndarray, values: np.ndarray, expert: np.ndarray) -> bool:
        """Count rows in a dense slot x group value x expert table; False (nothing counted) when the table
        would pass DENSE_BUDGET cells: a large vocabulary split by fold stays in the sparse counter."""
        slots = len(self.num_experts) * (self.folds if name == "split" else 1)
        V, E = int(values.max()) + 1, max(self.num_experts)
        table = self.dense.get(name)
        if table is None or V > table.shape[1]:
            width = max(V, 2 * (0 if table is None else table.shape[1]))
            if slots * min(width, DENSE_GROUPS) * E > DENSE_BUDGET:
                width = V
            if slots * width * E > DENSE_BUDGET:
                return False
            grown = np.zeros((slots, width, E), np.int32)  # a cell counts at most the rows seen
            if table is not None:
                grown[:, :table.shape[1]] = table
            table = self.dense[name] = grown
        self.dense_rows += len(slot)
        if self.dense_rows >= 1 << 31 and table.dtype != np.int64:
            table = self.dense[name] = table.astype(np.int64)
        cells, counts = np.unique((slot * table.shape[1] + values) * E + expert, return_counts=True)
        table.reshape(-1)[cells] += counts.astype(table.dtype)  # cells are distinct: no lost updates
        return True

    def _dense_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """The dense tables as (keys, counts) in the sparse counter's layout."""
        keys, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        L = len(self.num_experts)
        for name, table in self.dense.items():
            slot, v, e = np.nonzero(table)
            if name == "unsplit":
                slot = slot + L * (self.folds if self.folds > 1 else 0)
            keys.append((slot.astype(np.int64) << 48) | (v.astype(np.int64) << 16) | e)
            counts.append(table[np.nonzero(table)].astype(np.int64))
        return np.concatenate(keys), np.concatenate(counts)

    def _sampled(self, values: np.ndarray) -> np.ndarray:
        return mix64(values, self.seed + 0x5A) % np.uint64(self.fold_sample) == 0

    def result(self) -> ShareTables:
        keys, counts = self.counter.result()
        dense_keys, dense_counts = self._dense_entries()
        keys, counts = np.concatenate([keys, dense_keys]), np.concatenate([counts, dense_counts])
        slot_N, value_N, expert_N = keys >> 48, (keys >> 16) & 0xFFFFFFFF, keys & 0xFFFF
        layer_N, fold_N = slot_N % len(self.num_experts), slot_N // len(self.num_experts)
        groups, tables, entries = [], [], []
        for l, E in enumerate(self.num_experts):
            sel = layer_N == l
            g, inv = np.unique(value_N[sel], return_inverse=True)
            flat = np.bincount(inv * E + expert_N[sel], weights=counts[sel], minlength=len(g) * E)
            groups.append(g)
            tables.append(flat.astype(np.int64).reshape(len(g), E))
            split = sel & (fold_N < self.folds) if self.folds > 1 else np.zeros(len(sel), bool)
            entries.append(np.stack([fold_N[split], inv[split[sel]], expert_N[split], counts[split]]))
        names = self.labels.names if self.labels is not None else None
        out = ShareTables(group=self.group, ranks=self.ranks, num_experts=self.num_experts,
                          top_k=self.top_k, groups=groups, counts=tables, names=names)
        out.fold_entries, out.folds = entries, self.folds  # not fields: they stay out of metrics.json
        out.sampled = [self._sampled(g) if self.fold_sample > 1 else np.ones(len(g), bool) for g in groups]
        return out


def share_tables(trace_like: Any, group: str, num_experts: Sequence[int], top_k: int, *,
                 ranks: str = "all", pos_bucket: int = 256, batch_rows: int = 1 << 20) -> ShareTables:
    """E_i(g) count tables of a trace for one grouping, in one streaming pass."""
    acc = ShareAccumulator(group, num_experts, top_k, ranks=ranks, pos_bucket=pos_bucket)
    consume(iter_input(trace_like, acc.columns, batch_rows), [acc])
    return acc.result()


# ---- OpenMoE: std over experts of E_i(g) ----------------------------------------------------------
PERM_NULL = "group label shuffled across the layer's tokens (keeps expert load and group sizes)"
BOOT = "95% bootstrap over sequences"


def _std_G(counts_GE: np.ndarray, n_G: np.ndarray) -> np.ndarray:
    c = np.asarray(counts_GE, np.float64)
    return (c / np.maximum(c.sum(axis=1, keepdims=True), 1)).std(axis=1)


def _max_share_G(counts_GE: np.ndarray, n_G: np.ndarray) -> np.ndarray:
    """Share of the group's tokens that have its most frequent expert in their top-k."""
    return np.asarray(counts_GE, np.float64).max(axis=1) / np.maximum(n_G, 1e-12)


def _resampled(tables: ShareTables, l: int, keep: np.ndarray, stat_G: Callable, weights_RF: np.ndarray | None,
               pool: SetPool | None, n_permutations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap replicates (R) and permutation-null draws (P) of the mean over kept groups of stat_G."""
    n_G = tables.tokens(l)[keep]
    boot = []
    for t in tables.replicate_tables(l, weights_RF, keep):
        n_rep = t.sum(axis=1) / tables.choices_per_token
        ok = n_rep > 0
        boot.append(float(np.mean(stat_G(t[ok], n_rep[ok]))) if ok.any() else np.nan)
    sub = keep & getattr(tables, "sampled", [keep] * (l + 1))[l]
    if boot and sub.sum() < keep.sum():
        # Only a sample of the groups was split by fold: its replicates' deviations stand for the whole
        # mean's. Not shrunk by sqrt(sample / all): resampling sequences moves every group together
        # (measured: unshrunk widths match the full split within ~10%), so this errs wide if at all.
        value = float(np.mean(stat_G(tables.counts[l][keep], n_G)))
        value_sub = float(np.mean(stat_G(tables.counts[l][sub], tables.tokens(l)[sub]))) if sub.any() else np.nan
        boot = [value + (b - value_sub) for b in boot]
    if pool is None or not keep.any():
        return np.asarray(boot), np.full(n_permutations if pool is not None else 0, np.nan)
    sets, complete = pool.layer(l)
    sets = sets[:, :tables.choices_per_token]
    return np.asarray(boot), group_null(n_G, (sets, complete), tables.num_experts[l], stat_G, n_permutations, seed)


@dataclasses.dataclass
class StdScore(Result):
    group: str
    min_count: int
    groups: list[np.ndarray]  # per layer: groups with n(g) >= min_count
    std: list[np.ndarray]     # per layer: std over experts of E_i(g), numpy ddof=0
    mean: list[float]         # per layer: mean over those groups
    null_mean: list[float]    # permutation null: group label shuffled across tokens (keeps load, n(g))
    uniform_mean: list[float]  # reference: uniform random routing at the same n(g) (simulated)
    deterministic: list[float]  # ceiling: each group always routed to the same k experts
    mean_over_layers: float
    null_over_layers: float
    estimates: list[Estimate]  # per layer: value, 95% bootstrap interval, permutation null, p, z
    overall: Estimate          # the mean over layers, likewise


def std_score(tables: ShareTables, *, min_count: int = 128, null_seed: int = 0, pool: SetPool | None = None,
              n_permutations: int = 16, weights_RF: np.ndarray | None = None) -> StdScore:
    """OpenMoE's context-independent specialisation: 0 for uniform routing, about 0.12 for top-2 of 32.

    Its null shuffles the group label across a layer's tokens (`pool` holds their chosen sets): a skewed
    but context-free router sits at it, while uniform routing (`uniform_mean`) would not be its chance level."""
    k = tables.choices_per_token
    groups, stds, means, uniform, ceilings, boots, nulls = [], [], [], [], [], [], []
    for l, E in enumerate(tables.num_experts):
        n_G = tables.tokens(l)
        keep = n_G >= min_count
        std_G = tables.share(l)[keep].std(axis=1)
        sim = random_topk_counts(n_G[keep], E, k, null_seed + l)
        groups.append(tables.groups[l][keep])
        stds.append(std_G)
        means.append(float(std_G.mean()) if keep.any() else float("nan"))
        uniform.append(float(_std_G(sim, n_G).mean()) if keep.any() else float("nan"))
        ceilings.append(float(np.sqrt(1.0 / (k * E) - 1.0 / E**2)) if E > 1 else 0.0)
        b, n = _resampled(tables, l, keep, _std_G, weights_RF, pool, n_permutations, null_seed + 101 * l)
        boots.append(b)
        nulls.append(n)
    per, overall = layer_estimates(means, _stack(boots), _stack(nulls), null=PERM_NULL, interval=BOOT)
    return StdScore(group=tables.group, min_count=min_count, groups=groups, std=stds, mean=means,
                    null_mean=[e.null_mean for e in per], uniform_mean=uniform, deterministic=ceilings,
                    mean_over_layers=_nanmean(means), null_over_layers=overall.null_mean, estimates=per,
                    overall=overall)


def _stack(parts: list[np.ndarray]) -> np.ndarray | None:
    width = max((len(p) for p in parts), default=0)
    if width == 0:
        return None
    return np.stack([p if len(p) == width else np.full(width, np.nan) for p in parts])


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
    null_mean: list[float]      # permutation null: token IDs shuffled across tokens (keeps load, n(v))
    null_rescaled: list[float]
    uniform_mean: list[float]   # reference: uniform random routing at the same n(v) (simulated)
    uniform_rescaled: list[float]
    estimates: list[Estimate]   # per layer, of the rescaled value
    overall: Estimate           # mean over layers of the rescaled value


def vocab_specialisation(tables: ShareTables, *, min_count: int = 10, null_seed: int = 0,
                         pool: SetPool | None = None, n_permutations: int = 16,
                         weights_RF: np.ndarray | None = None) -> VocabSpecialisation:
    """OLMoE: count(v, e) = rows of token v with e in its top-k, n(v) = rows of v; mean of max_e ratio."""
    if tables.group != "token":
        raise MoelabError(f"vocabulary specialisation needs tables grouped by token, not {tables.group}")
    k = tables.choices_per_token
    toks, per, means, unif, boots, nulls = [], [], [], [], [], []
    for l, E in enumerate(tables.num_experts):
        n_G = tables.tokens(l)
        keep = n_G >= min_count
        p_G = tables.counts[l][keep].max(axis=1) / np.maximum(n_G[keep], 1)
        sim = random_topk_counts(n_G[keep], E, k, null_seed + l)
        unif.append(float((sim.max(axis=1) / np.maximum(sim.sum(axis=1) // k, 1)).mean()) if keep.any() else np.nan)
        toks.append(tables.groups[l][keep])
        per.append(p_G)
        means.append(float(p_G.mean()) if keep.any() else float("nan"))
        b, n = _resampled(tables, l, keep, _max_share_G, weights_RF, pool, n_permutations, null_seed + 103 * l)
        boots.append(_rescale(b, k / E))
        nulls.append(_rescale(n, k / E))
    resc = [float(_rescale(np.asarray(m), k / E)) for m, E in zip(means, tables.num_experts)]
    est, overall = layer_estimates(resc, _stack(boots), _stack(nulls), null=PERM_NULL, interval=BOOT)
    return VocabSpecialisation(
        min_count=min_count, tokens=toks, per_token=per, mean=means, rescaled=resc,
        null_mean=[float(np.nanmean(n)) if np.isfinite(n).any() else np.nan for n in
                   [_rescale_back(e.null_mean, k / E) for e, E in zip(est, tables.num_experts)]],
        null_rescaled=[e.null_mean for e in est], uniform_mean=unif,
        uniform_rescaled=[float(_rescale(np.asarray(u), k / E)) for u, E in zip(unif, tables.num_experts)],
        estimates=est, overall=overall)


def _rescale(p: np.ndarray, base: float) -> np.ndarray:
    return (np.asarray(p, np.float64) - base) / (1 - base) if base < 1 else np.full(np.shape(p), np.nan)


def _rescale_back(r: float, base: float) -> np.ndarray:
    return np.asarray(r * (1 - base) + base if base < 1 else np.nan)


@dataclasses.dataclass
class DomainSpecialisation(Result):
    group: str
    names: list[list[str]]    # per layer: group names
    share: list[np.ndarray]   # per layer G x E: share of g's tokens with e in their top-k
    uniform: list[float]      # reference: k/E, the share every expert gets under uniform routing
    null_share: list[np.ndarray]  # per layer, per expert: the layer's load share x k, every group's
    #                               expected share when the label is shuffled across tokens
    max_share: list[np.ndarray]   # per layer: max over experts, per group
    estimates: list[Estimate]     # per layer: mean over groups of max_share, interval and permutation null
    overall: Estimate


def domain_specialisation(tables: ShareTables, *, pool: SetPool | None = None, n_permutations: int = 16,
                          weights_RF: np.ndarray | None = None, null_seed: int = 0) -> DomainSpecialisation:
    """OLMoE: for each group (domain) and expert, the share of the group's tokens routed to the expert."""
    k = tables.choices_per_token
    L = len(tables.num_experts)
    shares = [tables.share(l) * k for l in range(L)]
    load = [tables.counts[l].sum(axis=0) / max(tables.counts[l].sum(), 1) * k for l in range(L)]
    values, boots, nulls = [], [], []
    for l in range(L):
        keep = tables.tokens(l) > 0
        values.append(float(shares[l].max(axis=1).mean()) if keep.any() and len(keep) > 1 else float("nan"))
        b, n = _resampled(tables, l, keep, _max_share_G, weights_RF, pool if len(keep) > 1 else None,
                          n_permutations, null_seed + 107 * l)
        boots.append(b)
        nulls.append(n)
    est, overall = layer_estimates(values, _stack(boots), _stack(nulls), null=PERM_NULL, interval=BOOT)
    return DomainSpecialisation(group=tables.group, names=[tables.group_names(l) for l in range(L)],
                                share=shares, uniform=[k / E for E in tables.num_experts], null_share=load,
                                max_share=[s.max(axis=1) if s.size else np.zeros(0) for s in shares],
                                estimates=est, overall=overall)


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
    estimates: list[Estimate]    # per layer, of the normalised MI
    overall: Estimate


def expert_label_mi(tables: ShareTables, *, n_permutations: int = 16, seed: int = 0,
                    weights_RF: np.ndarray | None = None) -> ExpertLabelMI:
    """MI between the expert of a choice and its group label, per layer, with a permutation null (the
    labels shuffled over the choices: the joint table is rebuilt from its margins, which it keeps)."""
    mi, nmi, null_m, null_s, null_n, boots, nulls = [], [], [], [], [], [], []
    for l in range(len(tables.num_experts)):
        c = tables.counts[l]
        value = mi_of(c) if c.size else float("nan")
        perm = permutation_mi(c, n_permutations, seed + l) if c.size else np.full(1, np.nan)
        mi.append(value)
        nmi.append(normalised_mi(value, c) if c.size else float("nan"))
        null_m.append(float(perm.mean()))
        null_s.append(float(perm.std()))
        null_n.append(normalised_mi(float(perm.mean()), c) if c.size else float("nan"))
        nulls.append(np.array([normalised_mi(float(p), c) for p in perm]) if c.size else np.zeros(0))
        keep = np.ones(len(c), bool)
        boots.append(np.array([normalised_mi(mi_of(t), t) for t in tables.replicate_tables(l, weights_RF, keep)]))
    est, overall = layer_estimates(nmi, _stack(boots), _stack(nulls),
                                   null="labels shuffled over the choices (keeps both margins)", interval=BOOT)
    return ExpertLabelMI(group=tables.group, ranks=tables.ranks, mi=mi, normalised=nmi, null_mean=null_m,
                         null_std=null_s, null_normalised=null_n, n_permutations=n_permutations,
                         estimates=est, overall=overall)


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
