"""Intervention results -> printed tables and the per-token Parquet file (no statistics here)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _ci(s: dict, sign: str = "+") -> str:
    return f"{s['mean']:{sign}.4f} [{s['lo']:{sign}.4f}, {s['hi']:{sign}.4f}]"


def format_ablation(rows: list[dict]) -> str:
    """One line per ablation: loss change overall (95% CI), p and Holm p, then per domain."""
    lines = [f"{'block':>5} {'experts':<10}{'d loss (95% CI)':<32}{'p':>8}{'p_holm':>8}  per domain"]
    for r in rows:
        a = r["all"]
        doms = "  ".join(f"{d}: {s['mean']:+.4f}" for d, s in r["domain"].items())
        experts = ",".join(map(str, r["experts"]))
        lines.append(f"{r['block']:>5} {experts:<10}{_ci(a):<32}{a['p']:>8.4f}{a['p_holm']:>8.4f}  {doms}")
    return "\n".join(lines)


def format_sweep(result: dict, title: str) -> str:
    lines = [title, f"{'setting':<22}{'loss (95% CI)':<32}{'d loss':>9}{'dropped':>9}  per domain"]
    for name, r in result.items():
        doms = "  ".join(f"{d}: {s['mean']:.4f}" for d, s in r["loss"]["domain"].items())
        lines.append(f"{name:<22}{_ci(r['loss']['all'], ''):<32}{r['delta']['all']['mean']:>+9.4f}"
                     f"{r['dropped']:>9.3f}  {doms}")
    return "\n".join(lines)


def format_observational(per_block: dict) -> str:
    lines = ["observational score vs causal effect (Spearman over experts, 95% CI)"]
    for block, r in per_block.items():
        cells = "  ".join(f"{name}: {v['rho']:+.2f} [{v['lo']:+.2f}, {v['hi']:+.2f}]" for name, v in r.items()
                          if isinstance(v, dict) and "rho" in v)
        lines.append(f"block {block}: {cells}")
    return "\n".join(lines)


def write_deltas(path: Path, tokens, base_N: np.ndarray, deltas_MN: np.ndarray, targets, names) -> None:
    """Long form: one row per (ablation, predicted token), published only when complete."""
    M, N = deltas_MN.shape
    labels = [f"{b}:{','.join(map(str, e))}" for b, e in targets]
    table = pa.table({
        "ablation": pa.DictionaryArray.from_arrays(np.repeat(np.arange(M, dtype=np.int32), N), labels),
        "block": np.repeat(np.array([b for b, _ in targets], np.int16), N),
        "seq": np.tile(tokens.seq.astype(np.int64), M),
        "pos": np.tile(tokens.pos.astype(np.int32), M),
        "domain": pa.DictionaryArray.from_arrays(np.tile(tokens.domain.astype(np.int32), M), names["domain"]),
        "lang": pa.DictionaryArray.from_arrays(np.tile(tokens.lang.astype(np.int32), M), names["lang"]),
        "base_loss": np.tile(base_N.astype(np.float32), M),
        "delta": deltas_MN.reshape(-1).astype(np.float32),
    })
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
