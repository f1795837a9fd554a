"""Routing-trace capture vs a plain forward pass of tiny-moe (eval mode, no_grad, capacity 2.0).

Two capture variants, each timed against the plain forward in the same rounds:
  rows: `RoutingRecorder` hooks + `trace.build.batch_rows` (the columns a trace holds, in memory);
  file: `trace_batches` writing the batch to a Parquet trace in a temporary directory (open, write, close).

    python benchmarks/bench_trace.py [--json rows.json]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

import moelab  # noqa: E402
from moelab.trace.build import batch_rows, trace_batches, trace_meta  # noqa: E402
from moelab.trace.capture import RoutingRecorder  # noqa: E402

BATCH, SEQ, CF = 8, 256, 2.0
TARGET = 1.3
DOMAINS, LANGS = ["web", "code"], ["en"]


def make_batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (BATCH, SEQ))
    zeros = torch.zeros_like(ids)
    return {"input_ids": ids, "doc": torch.arange(BATCH).unsqueeze(1).expand(BATCH, SEQ).contiguous(),
            "pos": torch.arange(SEQ).expand(BATCH, SEQ).contiguous(), "domain_id": zeros % 2,
            "lang_id": zeros, "turn": zeros}


def main() -> None:
    args = bc.parse_args(__doc__.splitlines()[0])
    bc.setup()
    bc.check_env()
    model = moelab.build_model("tiny-moe", seed=0).eval()
    batch = make_batch(model.config.vocab_size)
    blocks = model.config.moe_layer_ids()
    meta = trace_meta(model, CF, None, None, "bench", DOMAINS, LANGS)
    tmp = tempfile.TemporaryDirectory()
    out = Path(tmp.name) / "trace.parquet"

    @torch.no_grad()
    def plain():
        model(batch["input_ids"], capacity_factor=CF)

    @torch.no_grad()
    def rows():
        with RoutingRecorder(model) as rec:
            model(batch["input_ids"], capacity_factor=CF)
            return batch_rows(batch, rec.pop(), 0, DOMAINS, LANGS, blocks, full_probs=True)

    def to_file():
        trace_batches(model, [batch], out, meta, max_tokens=BATCH * SEQ, capacity_factor=CF)

    t = bc.interleaved({"plain": plain, "rows": rows, "file": to_file}, reps=max(args.reps, 15))
    tok = BATCH * SEQ
    tps = {k: f"{tok / t.median(k):,.0f} tok/s" for k in t}
    name = f"tiny-moe, {BATCH}x{SEQ} tokens"
    rows_out = [
        t.row("trace", f"{name}: recorder + batch_rows", "rows", "plain", "capture", "plain forward", TARGET,
              note=f"{tps['rows']} vs {tps['plain']}", device="cpu"),
        t.row("trace", f"{name}: trace_batches to Parquet", "file", "plain", "capture + write",
              "plain forward", TARGET, note=f"{tps['file']} vs {tps['plain']}", device="cpu"),
    ]
    tmp.cleanup()
    bc.emit(rows_out, args.json)


if __name__ == "__main__":
    main()
