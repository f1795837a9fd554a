"""`analyze_all`: every routing analysis over one streaming pass of a trace.

The accumulators all consume the same batches: regrouped so that no token (or, when re-simulating drops,
no block of `batch_seqs` sequences) straddles two batches, which suits the row-wise ones just as well.
Batches are sized so that the per-(token, layer) list columns stay near 64 MiB a batch.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Sequence

import numpy as np

from moelab.analysis.coactivation import CoactivationAccumulator
from moelab.analysis.common import consume, iter_input, plain, regroup, seq_block_key, token_key
from moelab.analysis.drops import DropAccumulator, queue_comparison
from moelab.analysis.dynamic import DynamicAccumulator
from moelab.analysis.gates import GateStatsAccumulator
from moelab.analysis.load import LoadAccumulator
from moelab.analysis.rankorder import drop_top1_parts, rank_order_known, unranked_note
from moelab.analysis.resample import FOLDS, REPLICATES, replicate_weights
from moelab.analysis.seqpool import SequencePoolAccumulator
from moelab.analysis.specialization import (
    ShareAccumulator, domain_combine, domain_layer, expert_label_mi, std_combine, std_layer,
    top_tokens_combine, top_tokens_layer, vocab_combine, vocab_layer,
)
from moelab.analysis.units import UnitAccumulator
from moelab.config import MoelabError

ANALYSES = ("load", "specialisation", "coactivation", "gates", "drops", "dynamic")
MIN_INTERVAL_SEQUENCES = 16  # below this a bootstrap over sequences has too few units to say anything
LIST_BUDGET_BYTES = 64 << 20


def token_fold_sample(num_rows: int | None, budget: int = 1 << 23) -> int:
    """1 in how many token IDs gets fold-split counts for the intervals: all up to `budget` rows, then
    a power of two that keeps the split rows near the budget (one key per choice, 16 bytes each)."""
    if not num_rows or num_rows <= budget:
        return 1
    return 1 << int(np.ceil(np.log2(num_rows / budget)))


def _batch_rows(columns: set[str], num_experts: Sequence[int], top_k: int, cap: int = 1 << 20) -> int:
    E = max(num_experts)
    width = {"probs": E, "expert_norms": E, "expert_density": E, "expert_cos": E * (E - 1) // 2}
    per_row = 4 * sum(w for c, w in width.items() if c in columns) / top_k  # lists live on rank-0 rows
    return int(min(cap, max(4096, LIST_BUDGET_BYTES / per_row))) if per_row else cap


def _resolve(trace_like: Any, num_experts: Any, top_k: int | None) -> tuple[list[int], int, set[str] | None]:
    meta = getattr(trace_like, "meta", None)
    if num_experts is None or top_k is None:
        if meta is None:
            raise MoelabError("analyze_all needs num_experts and top_k when given batches instead of a trace")
        num_experts = meta.num_experts if num_experts is None else num_experts
        top_k = meta.top_k if top_k is None else top_k
    have = set(trace_like.columns) if hasattr(trace_like, "columns") else None
    return list(num_experts), int(top_k), have


def analyze_all(trace_like: Any, *, num_experts: Sequence[int] | None = None, top_k: int | None = None,
                analyses: Sequence[str] = ANALYSES, labels: Sequence[str] = ("domain", "lang"),
                min_count: int = 128, vocab_min_count: int = 10, pos_bucket: int = 256,
                mi_ranks: str = "top1", n_permutations: int = 16, simulate: dict[str, Any] | None = None,
                queue: dict[str, Any] | None = None, n_bootstrap: int = REPLICATES, folds: int = FOLDS,
                seed: int = 0, batch_rows: int | None = None, workers: int = 1,
                timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Run the chosen analyses in one pass; returns name -> result (each with `to_dict()`; see `to_json_dict`).

    `simulate` (capacity_factor, formula, policy, group_size, batch_seqs) adds a re-simulated drop profile
    and its queue-only baseline; `queue` (the same keys: the trained capacity setting) adds the queue-only
    baseline of the trained drops. Intervals: `n_bootstrap` replicates over `folds` sequence folds (0: none).
    Analyses whose columns the trace lacks (probs, the all-experts columns) report None for those parts.
    A trace file is read unit by unit (its row groups cut at sequence starts); `workers` > 1 splits the
    units over that many processes and merges their accumulators (`parallel.py`): the results are bit
    for bit those of one worker, and so are the finalisation's jobs (scores, nulls, intervals), which run
    over the same workers. `timings`, when given, receives the wall seconds of the streaming pass
    (`stream_s`) and of the finalisation (`finalise_s`).
    """
    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown:
        raise MoelabError(f"unknown analysis {unknown[0]!r} (known: {', '.join(ANALYSES)})")
    num_experts, top_k, have = _resolve(trace_like, num_experts, top_k)
    meta = getattr(trace_like, "meta", None)
    skipped = unanswerable(have, analyses, {**(getattr(meta, "null_columns", None) or {}), **probs_why(meta)})
    analyses = [a for a in analyses if a not in skipped]
    ranked = rank_order_known(getattr(trace_like, "meta", None))
    if not ranked:  # rank 0 is not the top-1 choice (analysis/rankorder.py): leave out what reads it so
        skipped["rank"] = unranked_note()
        mi_ranks, simulate, queue = "all", None, None
    folds = folds if n_bootstrap > 0 else 1
    acc = _accumulators(num_experts, top_k, analyses, labels, pos_bucket, mi_ranks, simulate, queue, folds, seed,
                        token_fold_sample(getattr(trace_like, "num_rows", None)), with_tokens="token" not in skipped)
    columns = sorted({c for a in acc.values() for c in a.columns})
    present = set(columns) if have is None else set(columns) & have
    rows = batch_rows or _batch_rows(present, num_experts, top_k)
    blocks = sorted({a.simulate["batch_seqs"] for a in acc.values() if getattr(a, "simulate", None)})
    if len(blocks) > 1:
        raise MoelabError(f"drop re-simulations need one batch_seqs, got {blocks}")
    key = seq_block_key(blocks[0]) if blocks else token_key
    sequences = SequenceCounter()
    t0 = time.perf_counter()
    if getattr(trace_like, "path", None) is not None and hasattr(trace_like, "iter_batches"):
        from moelab.analysis.parallel import consume_parallel

        # `weight` is read only to be checked (a NaN there is a corrupt trace, as explore --full-check says)
        read = sorted(present | {"seq"} | ({"weight"} & (have or set())))
        consume_parallel(dict(acc, __sequences__=sequences), trace_like, read, rows, key,
                         blocks[0] if blocks else 1, workers)
    else:
        consume(regroup(iter_input(trace_like, columns, rows), key), list(acc.values()) + [sequences])
    if folds > 1 and sequences.count < MIN_INTERVAL_SEQUENCES:
        skipped["intervals"] = (f"No intervals: the trace holds {sequences.count} sequence(s), and a bootstrap over "
                                f"sequences needs at least {MIN_INTERVAL_SEQUENCES}; values and nulls only.")
    weights = replicate_weights(folds, n_bootstrap, seed) if folds > 1 and "intervals" not in skipped else None
    t1 = time.perf_counter()
    out = _finalise(acc, labels, dict(min_count=min_count, vocab_min_count=vocab_min_count,
                                      n_permutations=n_permutations, seed=seed, weights=weights), workers)
    if timings is not None:
        timings.update(stream_s=t1 - t0, finalise_s=time.perf_counter() - t1)
    if not ranked:
        drop_top1_parts(out)
    if skipped:
        out["skipped"] = skipped
    return out


class SequenceCounter:
    """How many sequences the pass saw: rows come in (seq, pos) order, so a sequence starts wherever `seq`
    changes (one comparison a row; a sequence cut across two batches counts once)."""

    columns = ("seq",)

    def __init__(self) -> None:
        self.count, self._first, self._last = 0, None, None

    def update(self, batch: dict[str, np.ndarray]) -> None:
        seq = batch["seq"]
        if len(seq):
            self.count += int(np.count_nonzero(seq[1:] != seq[:-1])) + int(self._last is None or seq[0] != self._last)
            self._first = seq[0] if self._first is None else self._first
            self._last = seq[-1]

    def merge(self, other: "SequenceCounter") -> None:
        """Add a later part of the stream; a sequence cut between the two counts once."""
        if other._first is None:
            return
        self.count += other.count - int(self._last is not None and other._first == self._last)
        self._first = other._first if self._first is None else self._first
        self._last = other._last


def unanswerable(have: set[str] | None, analyses: Sequence[str], why: dict[str, str]) -> dict[str, str]:
    """What a trace without token ids or router probabilities (an imported replay array, Megatron's
    records) cannot answer: name -> the sentence a report shows. "token" drops only the token-ID parts
    of specialisation; "gates" the whole gate analysis, which is built on the chosen experts' probabilities."""
    if have is None:
        return {}
    out = {}
    if "specialisation" in analyses and "token" not in have:
        reason = why.get("token", "the trace has no token ids")
        out["token"] = (f"No vocabulary specialisation, token-ID std score or top tokens: {reason}. Position and "
                        "label specialisation are computed.")
    if "gates" in analyses and "prob" not in have:
        reason = why.get("prob", "the trace has no router probabilities")
        out["gates"] = f"No gate entropy, inner/outer balance or cross-layer MI: {reason}."
    elif "probs" not in have and {"gates", "load"} & set(analyses):
        reason = why.get("probs", "the trace has no full router probabilities (traced with --probs none)")
        ranks = " or router-rank vs output-norm-rank table" if "dynamic" in analyses and "expert_norms" in have else ""
        out["probs"] = (f"No router entropy, gate entropy, cross-layer gate MI{ranks}: {reason}. The chosen experts' "
                        "probabilities (inner/outer balance) and everything built on the chosen experts are computed.")
    return out


def probs_why(meta: Any) -> dict[str, str]:
    """Why a trace has no full distribution, where its sidecar records what it kept (TraceMeta.probs_mode)."""
    mode = getattr(meta, "probs_mode", None) or ""
    if mode.startswith("top:"):
        return {"probs": f"the trace keeps only the {mode[4:]} largest router probabilities per token and layer "
                         f"(--probs {mode}), and these statistics need all E of them"}
    return {"probs": "the trace was written with --probs none"} if mode == "none" else {}


def _accumulators(num_experts: list[int], top_k: int, analyses: Sequence[str], labels: Sequence[str],
                  pos_bucket: int, mi_ranks: str, simulate: dict[str, Any] | None, queue: dict[str, Any] | None,
                  folds: int, seed: int, sample: int, with_tokens: bool = True) -> dict[str, Any]:
    """One accumulator per analysis (and the pool of chosen sets every permutation null draws from)."""
    acc: dict[str, Any] = {"pool": SequencePoolAccumulator(num_experts, top_k, seed=seed)}
    if "load" in analyses:
        acc["load"] = LoadAccumulator(num_experts, top_k, null_seed=seed, folds=folds)
    if "specialisation" in analyses:
        for group in ("token",) * with_tokens + ("pos", "pos_bucket") + tuple(labels):
            acc[f"tables:{group}"] = ShareAccumulator(group, num_experts, top_k, pos_bucket=pos_bucket,
                                                      folds=folds if group != "pos_bucket" else 1,
                                                      fold_sample=sample if group == "token" else 1)
        for group in labels if mi_ranks == "top1" else ():
            acc[f"tables_top1:{group}"] = ShareAccumulator(group, num_experts, top_k, ranks="top1", folds=folds)
        for group in labels:  # the labels' nulls shuffle whole documents (units.py)
            acc[f"units:{group}"] = UnitAccumulator(group, num_experts, top_k, seed=seed)
    if "coactivation" in analyses:
        acc["coactivation"] = CoactivationAccumulator(num_experts, top_k, folds=folds)
    if "gates" in analyses:
        acc["gates"] = GateStatsAccumulator(num_experts, top_k, null_seed=seed, folds=folds)
    if "drops" in analyses:
        acc["drops"] = DropAccumulator(num_experts, top_k, bucket_size=pos_bucket, folds=folds)
        for name, setting, shuffle in (("drops_queue", queue, True), ("drops_simulated", simulate, False),
                                       ("drops_simulated_queue", simulate, True)):
            if setting is not None:
                acc[name] = DropAccumulator(num_experts, top_k, bucket_size=pos_bucket, simulate=setting,
                                            shuffle_positions=shuffle, folds=folds, seed=seed)
    if "dynamic" in analyses:
        acc["dynamic"] = DynamicAccumulator(num_experts, folds=folds)
    return acc


def _finalise(acc: dict[str, Any], labels: Sequence[str], opts: dict[str, Any], workers: int = 1) -> dict[str, Any]:
    """Every result from the filled accumulators. The count tables come first (a job per table and layer); the scores,
    nulls and intervals built on them, and the other analyses' results, are independent jobs (`run_jobs`,
    over `workers` processes, which inherit the tables)."""
    from moelab.analysis.parallel import run_jobs

    # The count tables first, a job per table and layer (a third of the serial time was building them one by
    # one; then the vocabulary table alone, 3.5 s of a 16-worker run's 10.7 s at 33.5M rows).
    share = {name: a for name, a in acc.items() if name.startswith("tables")}
    first = sorted(share, key=lambda name: name != "tables:token")  # the largest: handed out first
    parts = run_jobs({f"{name}@{l}": partial(share[name].layer_result, l) for name in first
                      for l in range(len(share[name].num_experts))}, workers)
    built = {name: a.result(layers=[parts.pop(f"{name}@{l}") for l in range(len(a.num_experts))])
             for name, a in share.items()}
    for name in share:  # their streamed counts (a position table split by fold: 2^26 cells) are in the tables
        acc[name] = None  # now: let them go before the next round forks a worker per core from this process
    share.clear()
    tables = {name.split(":", 1)[1]: t for name, t in built.items() if name.startswith("tables:")}
    top1 = {name.split(":", 1)[1]: t for name, t in built.items() if name.startswith("tables_top1:")}
    pool = acc.pop("pool").result()
    units = {name.split(":", 1)[1]: acc.pop(name).result() for name in [n for n in acc if n.startswith("units:")]}
    seed, weights, n_perm = opts["seed"], opts["weights"], opts["n_permutations"]
    kw = dict(null_seed=seed, pool=pool, n_permutations=n_perm, weights_RF=weights)
    jobs: dict[str, Any] = {}
    L = len(pool.sets)
    # The large analyses go layer by layer (one job a layer, combined below), so the finalisation spreads
    # over many workers; roughly largest first (measured on 33.5M- and 128M-row traces), the pool hands
    # jobs out in this order.
    if "token" in tables:
        for l in range(L):
            jobs[f"vocab@{l}"] = partial(vocab_layer, tables["token"], l, min_count=opts["vocab_min_count"], **kw)
        for l in range(L):  # the within-sequence null costs the token score as much as vocab's: not one tail job
            jobs[f"std_token@{l}"] = partial(std_layer, tables["token"], l, min_count=opts["min_count"], **kw)
    for group in labels if tables else ():
        for l in range(L):
            jobs[f"domain_specialisation:{group}@{l}"] = partial(domain_layer, tables[group], l, units=units.get(group),
                                                                 **kw)
    coact = acc.get("coactivation")
    for l in range(L if coact is not None else 0):
        jobs[f"coactivation@{l}"] = partial(coact.strongest_layer, l, weights, n_perm)
    if "token" in tables:
        for l in range(L):
            jobs[f"top_tokens@{l}"] = partial(top_tokens_layer, tables["token"], l, min_count=opts["vocab_min_count"])
    if tables:  # the position score layer by layer: its uniform reference simulates every token
        for l in range(L):
            jobs[f"std_position@{l}"] = partial(std_layer, tables["pos"], l, min_count=1, **kw)
    jobs.update({name: partial(a.result, weights=weights, pool=pool, n_permutations=n_perm)
                 for name, a in acc.items() if not name.startswith("tables") and name != "coactivation"})
    for group in labels if tables else ():
        jobs[f"mi:{group}"] = partial(expert_label_mi, top1.get(group, tables[group]), n_permutations=n_perm,
                                      seed=seed, weights_RF=weights, units=units.get(group))
    done = run_jobs(jobs, workers)

    def layers(name: str) -> list[Any]:
        return [done.pop(f"{name}@{l}") for l in range(L)]

    if coact is not None:
        done["coactivation"] = coact.result(weights=weights, n_permutations=n_perm,
                                            layers=layers("coactivation"))
    out: dict[str, Any] = {name: done[name] for name in acc if not name.startswith("tables")}
    for name, observed in (("queue:trained", "drops"), ("queue:simulated", "drops_simulated")):
        queue = out.get("drops_queue" if observed == "drops" else "drops_simulated_queue")
        if queue is not None and observed in out:
            out[name] = queue_comparison(out[observed], queue)
    if tables:
        out["tables"] = tables
        done["std_position"] = std_combine(tables["pos"], 1, layers("std_position"))
        if "token" in tables:
            done["std_token"] = std_combine(tables["token"], opts["min_count"], layers("std_token"))
            done["vocab"] = vocab_combine(tables["token"], opts["vocab_min_count"], layers("vocab"))
            done["top_tokens"] = top_tokens_combine(layers("top_tokens"))
        for group in labels:
            done[f"domain_specialisation:{group}"] = domain_combine(tables[group],
                                                                    layers(f"domain_specialisation:{group}"))
        order = ["std_position", "std_token", "vocab", "top_tokens"]
        order += [f"{kind}:{group}" for group in labels for kind in ("domain_specialisation", "mi")]
        out.update({name: done[name] for name in order if name in done})
    return out


def to_json_dict(results: dict[str, Any]) -> dict[str, Any]:
    """analyze_all's results as plain JSON-ready values."""
    return plain(results)
