"""Expert specialisation: E_i(g) tables, OpenMoE's std score, OLMoE's vocabulary and domain
specialisation, expert-label mutual information, and the top tokens of each expert.

The tables come from `tables.ShareAccumulator` (E_i(g) counts per layer, group and expert). Every score
below is a pure function of them and comes with its null (the group label shuffled across the layer's
tokens, which keeps expert load and group sizes; uniform routing stays beside it as a named reference)
and a bootstrap interval over sequences (`resample`). A document's label (domain, language) is shuffled
across whole documents instead (`units.py`), given the documents' counts: its tokens are routed alike,
and a token shuffle would read that likeness as specialisation.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from moelab.analysis.common import Result
from moelab.analysis.null import mutual_information as mi_of, normalised_mi, permutation_mi, random_topk_counts
from moelab.analysis.resample import Estimate, SetPool, group_null, layer_estimates, stack_ragged
from moelab.analysis.tables import (  # noqa: F401 - re-exported: the tables' public home stays importable here
    GROUPS, INT_GROUPS, LABEL_GROUPS, ShareAccumulator, ShareTables, share_tables,
)
from moelab.analysis.seqpool import SAMPLE_NULL, SEQ_NULL, SequencePool, group_values, within_sequence_null
from moelab.analysis.units import NULL, UnitTable, unit_null, unit_tables
from moelab.config import MoelabError

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
    values = within_sequence_values(pool, l, tables)
    if values is not None:
        full = float(np.mean(stat_G(tables.counts[l][keep], n_G)))  # the sample test's anchor (seqpool.py)
        return np.asarray(boot), within_sequence_null(pool, l, values, tables.groups[l][keep], tables.num_experts[l],
                                                      stat_G, n_permutations, seed, value=full,
                                                      min_count=int(n_G.min()))
    sets, complete = pool.layer(l)
    sets = sets[:, :tables.choices_per_token]
    return np.asarray(boot), group_null(n_G, (sets, complete), tables.num_experts[l], stat_G, n_permutations, seed)


def within_sequence_values(pool: SetPool | SequencePool | None, l: int, tables: ShareTables) -> np.ndarray | None:
    """The pooled tokens' group values where layer l's null can shuffle within sequences (a token-level
    grouping over all ranks; every token of the layer in the pool, or a sample of whole sequences), else
    None (the token shuffle, `group_null`)."""
    if not isinstance(pool, SequencePool) or tables.ranks != "all":
        return None
    return group_values(pool, l, tables.group, getattr(tables, "pos_bucket", 256))


def null_text(pool: SetPool | SequencePool | None, l: int, tables: ShareTables) -> str:
    """What layer l's null of a token-level grouping shuffles."""
    if not isinstance(pool, SequencePool) or tables.ranks != "all" or group_values(pool, l, tables.group) is None:
        return PERM_NULL  # a grouping the pool holds no values of (turn, doc_pos): the token shuffle
    return SEQ_NULL if pool.within_sequence(l) else SAMPLE_NULL


def _combined_null(layers: list[dict]) -> str:
    """The layers' null, said once: where layers differ, the sample test some of them ran."""
    texts = {p.get("null_text", PERM_NULL) for p in layers}
    return texts.pop() if len(texts) == 1 else SAMPLE_NULL


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
    but context-free router sits at it, while uniform routing (`uniform_mean`) would not be its chance level.
    Layer by layer (`std_layer`, each seeded on its own) and then combined (`std_combine`), so the layers
    can be computed apart (analysis/suite.py hands them to the workers)."""
    kw = dict(min_count=min_count, null_seed=null_seed, pool=pool, n_permutations=n_permutations,
              weights_RF=weights_RF)
    return std_combine(tables, min_count, [std_layer(tables, l, **kw) for l in range(len(tables.num_experts))])


def std_layer(tables: ShareTables, l: int, *, min_count: int = 128, null_seed: int = 0, pool: SetPool | None = None,
              n_permutations: int = 16, weights_RF: np.ndarray | None = None) -> dict:
    """One layer's part of `std_score`: its groups, std per group, mean, uniform reference, ceiling,
    bootstrap replicates and null draws."""
    k, E = tables.choices_per_token, tables.num_experts[l]
    n_G = tables.tokens(l)
    keep = n_G >= min_count
    std_G = tables.share(l)[keep].std(axis=1)
    sim = random_topk_counts(n_G[keep], E, k, null_seed + l)
    boot, null = _resampled(tables, l, keep, _std_G, weights_RF, pool, n_permutations, null_seed + 101 * l)
    return {"groups": tables.groups[l][keep], "std": std_G, "null_text": null_text(pool, l, tables),
            "mean": float(std_G.mean()) if keep.any() else float("nan"),
            "uniform": float(_std_G(sim, n_G).mean()) if keep.any() else float("nan"),
            "ceiling": float(np.sqrt(1.0 / (k * E) - 1.0 / E**2)) if E > 1 else 0.0, "boot": boot, "null": null}


def std_combine(tables: ShareTables, min_count: int, layers: list[dict]) -> StdScore:
    """`std_score` from its layers' parts (`std_layer`, in layer order)."""
    means = [p["mean"] for p in layers]
    per, overall = layer_estimates(means, stack_ragged([p["boot"] for p in layers]),
                                   stack_ragged([p["null"] for p in layers]),
                                   null=_combined_null(layers), interval=BOOT)
    return StdScore(group=tables.group, min_count=min_count, groups=[p["groups"] for p in layers],
                    std=[p["std"] for p in layers], mean=means, null_mean=[e.null_mean for e in per],
                    uniform_mean=[p["uniform"] for p in layers], deterministic=[p["ceiling"] for p in layers],
                    mean_over_layers=_nanmean(means), null_over_layers=overall.null_mean, estimates=per,
                    overall=overall)


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
    """OLMoE: count(v, e) = rows of token v with e in its top-k, n(v) = rows of v; mean of max_e ratio.
    Layer by layer (`vocab_layer`, each seeded on its own), then combined (`vocab_combine`)."""
    kw = dict(min_count=min_count, null_seed=null_seed, pool=pool, n_permutations=n_permutations,
              weights_RF=weights_RF)
    return vocab_combine(tables, min_count, [vocab_layer(tables, l, **kw) for l in range(len(tables.num_experts))])


def vocab_layer(tables: ShareTables, l: int, *, min_count: int = 10, null_seed: int = 0,
                pool: SetPool | None = None, n_permutations: int = 16,
                weights_RF: np.ndarray | None = None) -> dict:
    """One layer's part of `vocab_specialisation`: its tokens, per-token max share, uniform reference,
    rescaled bootstrap replicates and null draws."""
    if tables.group != "token":
        raise MoelabError(f"vocabulary specialisation needs tables grouped by token, not {tables.group}")
    k, E = tables.choices_per_token, tables.num_experts[l]
    n_G = tables.tokens(l)
    keep = n_G >= min_count
    p_G = tables.counts[l][keep].max(axis=1) / np.maximum(n_G[keep], 1)
    sim = random_topk_counts(n_G[keep], E, k, null_seed + l)
    b, n = _resampled(tables, l, keep, _max_share_G, weights_RF, pool, n_permutations, null_seed + 103 * l)
    return {"tokens": tables.groups[l][keep], "per": p_G, "null_text": null_text(pool, l, tables),
            "mean": float(p_G.mean()) if keep.any() else float("nan"),
            "uniform": float((sim.max(axis=1) / np.maximum(sim.sum(axis=1) // k, 1)).mean()) if keep.any()
            else np.nan, "boot": _rescale(b, k / E), "null": _rescale(n, k / E)}


def vocab_combine(tables: ShareTables, min_count: int, layers: list[dict]) -> VocabSpecialisation:
    """`vocab_specialisation` from its layers' parts (`vocab_layer`, in layer order)."""
    means, unif = [p["mean"] for p in layers], [p["uniform"] for p in layers]
    resc = [float(_rescale(np.asarray(m), k_E)) for m, k_E in zip(means, _base(tables))]
    est, overall = layer_estimates(resc, stack_ragged([p["boot"] for p in layers]),
                                   stack_ragged([p["null"] for p in layers]),
                                   null=_combined_null(layers), interval=BOOT)
    return VocabSpecialisation(
        min_count=min_count, tokens=[p["tokens"] for p in layers], per_token=[p["per"] for p in layers],
        mean=means, rescaled=resc,
        null_mean=[float(np.nanmean(n)) if np.isfinite(n).any() else np.nan for n in
                   [_rescale_back(e.null_mean, k_E) for e, k_E in zip(est, _base(tables))]],
        null_rescaled=[e.null_mean for e in est], uniform_mean=unif,
        uniform_rescaled=[float(_rescale(np.asarray(u), k_E)) for u, k_E in zip(unif, _base(tables))],
        estimates=est, overall=overall)


def _base(tables: ShareTables) -> list[float]:
    """k/E per layer: the share any expert gets under uniform routing."""
    return [tables.choices_per_token / E for E in tables.num_experts]


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
    #                               expected share when the label is shuffled (across tokens or documents)
    max_share: list[np.ndarray]   # per layer: max over experts, per group
    estimates: list[Estimate]     # per layer: mean over groups of max_share, interval and permutation null
    overall: Estimate


def domain_specialisation(tables: ShareTables, *, pool: SetPool | None = None, n_permutations: int = 16,
                          weights_RF: np.ndarray | None = None, null_seed: int = 0) -> DomainSpecialisation:
    """OLMoE: for each group (domain) and expert, the share of the group's tokens routed to the expert.
    Layer by layer (`domain_layer`), then combined (`domain_combine`)."""
    kw = dict(pool=pool, n_permutations=n_permutations, weights_RF=weights_RF, null_seed=null_seed)
    return domain_combine(tables, [domain_layer(tables, l, **kw) for l in range(len(tables.num_experts))])


def domain_layer(tables: ShareTables, l: int, *, pool: SetPool | None = None, n_permutations: int = 16,
                 weights_RF: np.ndarray | None = None, null_seed: int = 0, units: UnitTable | None = None) -> dict:
    """One layer's part of `domain_specialisation`: its value, bootstrap replicates and null draws.
    With `units` (the label's documents, `units.py`) the null shuffles the label over whole documents
    (the same draws in every layer); without, over single tokens from `pool`."""
    share = tables.share(l) * tables.choices_per_token
    keep = tables.tokens(l) > 0
    several = len(keep) > 1
    b, n = _resampled(tables, l, keep, _max_share_G, weights_RF, pool if several and units is None else None,
                      n_permutations, null_seed + 107 * l)
    if units is not None:
        k = tables.choices_per_token
        n = (unit_null(units, l, tables.num_experts[l], tables.ranks,
                       lambda t: float(np.mean(_max_share_G(t, t.sum(axis=1) / k))), n_permutations, null_seed + 107,
                       total_E=tables.counts[l].sum(axis=0)) if several else np.full(n_permutations, np.nan))
    return {"value": float(share.max(axis=1).mean()) if keep.any() and several else float("nan"),
            "boot": b, "null": n, "null_text": NULL if units is not None else PERM_NULL}


def domain_combine(tables: ShareTables, layers: list[dict]) -> DomainSpecialisation:
    """`domain_specialisation` from its layers' parts (`domain_layer`, in layer order)."""
    k = tables.choices_per_token
    L = len(tables.num_experts)
    shares = [tables.share(l) * k for l in range(L)]
    load = [tables.counts[l].sum(axis=0) / max(tables.counts[l].sum(), 1) * k for l in range(L)]
    est, overall = layer_estimates([p["value"] for p in layers], stack_ragged([p["boot"] for p in layers]),
                                   stack_ragged([p["null"] for p in layers]), null=_combined_null(layers),
                                   interval=BOOT)
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
                    weights_RF: np.ndarray | None = None, units: UnitTable | None = None) -> ExpertLabelMI:
    """MI between the expert of a choice and its group label, per layer, with a permutation null: with
    `units` (the label's documents, `units.py`) the labels shuffled over whole documents, the same draws
    in every layer; without, over the choices (the joint table is rebuilt from its margins, which it keeps)."""
    mi, nmi, null_m, null_s, null_n, boots, nulls = [], [], [], [], [], [], []
    for l in range(len(tables.num_experts)):
        c = tables.counts[l]
        value = mi_of(c) if c.size else float("nan")
        if units is not None and c.size:
            shuffled = unit_tables(units, l, tables.num_experts[l], tables.ranks, n_permutations, seed + 0x3F,
                                   c.sum(axis=0))
            perm = np.array([mi_of(t) for t in shuffled])
            perm_n = np.array([normalised_mi(p, t) for p, t in zip(perm, shuffled)])
        else:
            perm = permutation_mi(c, n_permutations, seed + l) if c.size else np.full(1, np.nan)
            perm_n = np.array([normalised_mi(float(p), c) for p in perm]) if c.size else np.zeros(0)
        mi.append(value)
        nmi.append(normalised_mi(value, c) if c.size else float("nan"))
        perm_mean = float(perm.mean()) if perm.size else float("nan")
        null_m.append(perm_mean)
        null_s.append(float(perm.std()) if perm.size else float("nan"))
        null_n.append(float(perm_n.mean()) if units is not None and perm_n.size else
                      normalised_mi(perm_mean, c) if c.size else float("nan"))
        nulls.append(perm_n)
        keep = np.ones(len(c), bool)
        boots.append(np.array([normalised_mi(mi_of(t), t) for t in tables.replicate_tables(l, weights_RF, keep)]))
    est, overall = layer_estimates(nmi, stack_ragged(boots), stack_ragged(nulls),
                                   null=NULL if units is not None else
                                   "labels shuffled over the choices (keeps both margins)", interval=BOOT)
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
    """Each expert's most frequent tokens and the tokens most over-represented in it (null lift = 1).
    Layer by layer (`top_tokens_layer`), so the layers can be computed apart."""
    return top_tokens_combine([top_tokens_layer(tables, l, n=n, min_count=min_count)
                               for l in range(len(tables.num_experts))])


def stable_top(values_GE: np.ndarray, n: int) -> np.ndarray:
    """np.argsort(-values_GE, axis=0, kind="stable")[:n].T (E x n: each column's n largest, ties by row)
    without sorting the whole column: a partition finds the n-th value, and only the rows above it and the
    first rows equal to it are sorted (a 32k-token vocabulary sorted 64 columns twice a layer)."""
    G, E = values_GE.shape
    neg_GE = -values_GE
    if G <= n or np.isnan(neg_GE).any():
        return np.argsort(neg_GE, axis=0, kind="stable")[:n].T
    kth_E = np.partition(neg_GE, n - 1, axis=0)[n - 1]
    out = np.empty((E, n), np.int64)
    for e in range(E):
        v = neg_GE[:, e]
        below = np.flatnonzero(v < kth_E[e])
        rows = np.sort(np.r_[below, np.flatnonzero(v == kth_E[e])[:n - len(below)]])
        out[e] = rows[np.argsort(v[rows], kind="stable")]
    return out


def top_tokens_layer(tables: ShareTables, l: int, *, n: int = 10, min_count: int = 10) -> tuple:
    """One layer's (ids by count, counts, ids by lift, lifts)."""
    if tables.group != "token":
        raise MoelabError(f"top tokens need tables grouped by token, not {tables.group}")
    c_GE, g = tables.counts[l].astype(np.float64), tables.groups[l]
    top = stable_top(c_GE, n)
    rate_G = c_GE.sum(axis=1) / max(c_GE.sum(), 1)
    lift_GE = c_GE / np.maximum(c_GE.sum(axis=0), 1) / np.maximum(rate_G, 1e-300)[:, None]
    lift_GE[tables.tokens(l) < min_count] = -np.inf
    best = stable_top(lift_GE, n)
    lift_EN = np.take_along_axis(lift_GE.T, best, axis=1)
    ok = np.isfinite(lift_EN)
    return (g[top], np.take_along_axis(c_GE.T, top, axis=1).astype(np.int64), np.where(ok, g[best], -1),
            np.where(ok, lift_EN, np.nan))


def top_tokens_combine(layers: list[tuple]) -> TopTokens:
    """`top_tokens` from its layers' parts (`top_tokens_layer`, in layer order)."""
    return TopTokens(by_count=[p[0] for p in layers], counts=[p[1] for p in layers],
                     by_lift=[p[2] for p in layers], lift=[p[3] for p in layers])
