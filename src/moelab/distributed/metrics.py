"""Reduce per-rank training metrics across processes by each metric's declared reduction.

`moelab.train.metrics.REDUCTIONS` declares the model and routing metrics; the two the loop adds itself
are declared here: the learning rate is identical on every rank, and throughput adds up over ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelab.distributed.mesh import Parallel, collective
from moelab.train.metrics import REDUCTIONS

LOOP_REDUCTIONS = {"lr": "mean", "tokens_per_second": "sum"}


def reduction_of(name: str) -> str:
    """The declared reduction of a metric name (the part after the last "/" for per-layer names)."""
    base = name.split("/")[-1]
    if base in LOOP_REDUCTIONS:
        return LOOP_REDUCTIONS[base]
    if base not in REDUCTIONS:
        raise KeyError(f"metric {name!r} declares no cross-rank reduction (add it to REDUCTIONS)")
    return REDUCTIONS[base]


def reduce_metrics(metrics: dict[str, float], par: Parallel) -> dict[str, float]:
    """Every rank calls this with the same keys; every rank gets the reduced values back.

    One all-reduce per kind of reduction (sum, max), in float64 so sums of many ranks stay exact.
    """
    if par.world == 1:
        return dict(metrics)
    names = sorted(metrics)  # the same order on every rank
    # nccl reduces only tensors on the GPU: build the values on the mesh's device type.
    device = par.mesh.device_type if par.mesh is not None else "cpu"
    out: dict[str, float] = {}
    for kind in ("sum", "max"):
        # A mean is a sum divided by the world size afterwards (equal shards per rank).
        keys = [n for n in names if (reduction_of(n) == "max") == (kind == "max")]
        if not keys:
            continue
        vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                            device=device)
        with collective(f"metric {kind}"):
            dist.all_reduce(vals, op=dist.ReduceOp.MAX if kind == "max" else dist.ReduceOp.SUM)
        for k, v in zip(keys, vals.tolist()):
            out[k] = v / par.world if reduction_of(k) == "mean" else v
    return {k: out[k] for k in metrics}
