"""Streaming trace read with the rule checks (validate.BatchValidator) against the same read without them.

A planted trace (top-8 of 64 experts, 4 layers, full router probabilities) is written once to a temporary
directory; each round reads it through `Trace.iter_batches` with `validate=True` and with `validate=False`,
interleaved. Two reads: every column (what `analyze_all` asks for) and the routing columns only.

    python benchmarks/bench_trace_read.py [--json rows.json]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

from moelab.analysis.synthetic import planted_batches  # noqa: E402
from moelab.trace.io import TraceWriter, open_trace  # noqa: E402
from moelab.trace.schema import TraceMeta  # noqa: E402

SEQS, SEQ_LEN, LAYERS, E, K = 64, 256, 4, 64, 8
TARGET = 1.10
ROUTING = ["seq", "pos", "layer", "rank", "expert", "prob"]


def write_trace(path: Path) -> int:
    meta = TraceMeta(num_experts=[E] * LAYERS, top_k=K)
    with TraceWriter(path, meta) as w:
        for b in planted_batches(num_seqs=SEQS, seq_len=SEQ_LEN, num_layers=LAYERS, num_experts=E, top_k=K,
                                 seqs_per_batch=16):
            w.write(b)
        return w.num_rows if w.num_rows else 0


def main() -> None:
    args = bc.parse_args(__doc__.splitlines()[0])
    bc.setup()
    bc.check_env()
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / "trace.parquet"
    write_trace(path)
    trace = open_trace(path)

    def read(columns, validate):
        def run():
            for _ in trace.iter_batches(columns=columns, validate=validate):
                pass
        return run

    t = bc.interleaved({"all_v": read(None, True), "all_n": read(None, False),
                        "rt_v": read(ROUTING, True), "rt_n": read(ROUTING, False)}, reps=max(args.reps, 9))
    name = f"{trace.num_rows:,} rows, top-{K} of {E}, {LAYERS} layers"
    rows = [
        t.row("trace-read", f"{name}: every column", "all_v", "all_n", "read + checks", "read", TARGET,
              device="cpu"),
        t.row("trace-read", f"{name}: routing columns", "rt_v", "rt_n", "read + checks", "read", TARGET,
              device="cpu"),
    ]
    tmp.cleanup()
    bc.emit(rows, args.json)


if __name__ == "__main__":
    main()
