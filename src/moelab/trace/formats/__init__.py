"""Other tools' routing traces in and out of moelab's trace format: one reader per format, one shared writer
(`routed.write_routed`), and the replay-array export."""

from __future__ import annotations

from pathlib import Path

from moelab.config import MoelabError

FORMATS = ("megatron", "replay", "olmoe")


def import_trace(fmt: str, src: str | Path, out: str | Path, *, num_experts: int | None = None,
                 corpus: str | Path | None = None, split: str = "heldout", micro_batch: int = 1,
                 overwrite: bool = True) -> dict:
    """Read `src` in format `fmt` and write a moelab trace at `out` (an existing one only with `overwrite`);
    returns counts and the notes."""
    from moelab.trace.filemeta import check_trace_out
    from moelab.trace.formats import megatron, olmoe, replay
    from moelab.trace.formats.routed import write_routed
    from moelab.trace.formats.values import MAX_COUNT, MAX_EXPERTS, check_count

    check_trace_out(out, overwrite=overwrite)  # before reading anything: an existing folder would leave X.tmp and X.json behind
    check_count(micro_batch, "--micro-batch", 1, MAX_COUNT)
    check_count(num_experts, "--num-experts", 1, MAX_EXPERTS)

    notes: list[str] = []
    skipped = [0]
    if fmt == "megatron":
        source, lacks = (lambda: megatron.read_megatron(src, micro_batch, skipped)), megatron.WHAT_LACKS
        fmt_name = "Megatron-LM RouterTracer JSONL"
    elif fmt == "replay":
        source, lacks, fmt_name = (lambda: replay.read_replay(src)), replay.WHAT_LACKS, "a router-replay array"
    elif fmt == "olmoe":
        source, lacks, fmt_name = (lambda: olmoe.read_olmoe(src)), olmoe.WHAT_LACKS, "OLMoE routing JSONL"
    else:
        raise MoelabError(f"unknown trace format {fmt!r} (known: {', '.join(FORMATS)})")
    if fmt == "megatron" and micro_batch > 1:
        notes.append(f"tokens split into micro-batch rows of {micro_batch}, position-major as Megatron flattens [s, b]")

    def after_scan() -> list[str]:
        mtp = [f"{skipped[0]} multi-token-prediction (mtp) records were left out"] if skipped[0] else []
        return notes + mtp

    # RouterTracer lists each token's experts in routing_map.nonzero() order (ascending id), not by score
    return write_routed(out, source, fmt=fmt, name=fmt_name, what_lacks=lacks, num_experts=num_experts, corpus=corpus,
                        split=split, notes=after_scan, rank_order="unknown" if fmt == "megatron" else "logits")
