"""`analyze_all` over several worker processes: the accumulators are split between them.

Every worker streams the whole trace in the same batches (same `batch_rows`, same regrouping) and feeds
only its share of the accumulators; the parent gets the filled accumulators back and finalises them as
one process would. Each accumulator therefore sees exactly the batches, in the order, of the one-worker
pass, so its state (seeded nulls included: GateStats' generator advances batch by batch) and the
finalised results are bit for bit those of one worker. The cost: each worker decodes the columns its
accumulators need, so the speed-up is bounded by the heaviest accumulator (specialisation by token).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any, Callable, Iterable

from moelab.analysis.common import consume

# Relative cost of one accumulator per row (measured on a 16-layer top-8-of-64 trace; only the split uses it).
_COST = {"pool": 1.0, "load": 0.5, "coactivation": 1.5, "gates": 2.0, "dynamic": 1.0, "drops": 1.5,
         "tables:token": 3.0}
_FORK_STATE: dict[str, Any] = {}


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def split(keys: list[str], workers: int) -> list[list[str]]:
    """Greedy longest-first split of accumulator names into at most `workers` parts of similar cost."""
    parts: list[list[str]] = [[] for _ in range(min(workers, len(keys)))]
    load = [0.0] * len(parts)
    for k in sorted(keys, key=lambda k: -_COST.get(k, 1.0)):
        i = load.index(min(load))
        parts[i].append(k)
        load[i] += _COST.get(k, 1.0)
    return [p for p in parts if p]


def _run_part(index: int) -> dict[str, Any]:
    st = _FORK_STATE
    keys = st["parts"][index]
    accs = [st["acc"][k] for k in keys] + ([st["sequences"]] if index == 0 else [])
    consume(st["batches"](sorted({c for a in accs for c in a.columns})), accs)
    return {k: st["acc"][k] for k in keys} | ({"__sequences__": st["sequences"]} if index == 0 else {})


def consume_parallel(acc: dict[str, Any], sequences: Any, batches: Callable[[list[str]], Iterable[Any]],
                     workers: int) -> None:
    """Fill `acc` (and `sequences`) in place over `workers` forked processes; `batches(columns)` opens
    the stream of those columns. Falls back to one pass here when fork is unavailable."""
    parts = split(list(acc), workers)
    if len(parts) < 2 or "fork" not in mp.get_all_start_methods():
        columns = sorted({c for a in list(acc.values()) + [sequences] for c in a.columns})
        consume(batches(columns), list(acc.values()) + [sequences])
        return
    _FORK_STATE.update(acc=acc, sequences=sequences, batches=batches, parts=parts)
    try:
        with mp.get_context("fork").Pool(len(parts)) as pool:
            filled = pool.map(_run_part, range(len(parts)))
    finally:
        _FORK_STATE.clear()
    for part in filled:
        seq = part.pop("__sequences__", None)
        if seq is not None:
            sequences.__dict__.update(seq.__dict__)
        acc.update(part)
