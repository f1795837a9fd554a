"""`moelab trace`: stream a model's routing over a corpus into a Parquet trace; `moelab trace import` and
`moelab trace export` convert other tools' routing records in and out (docs/TRACE.md)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from moelab.config import MoelabError, positive_int


class _TraceDispatch:
    """`moelab trace CKPT ...` records routing; `moelab trace import|export ...` converts it. The first word
    decides, so that the recording form keeps its optional positional checkpoint and every old command line
    parses as before. A mixin over the CLI's own parser class, so usage errors stay one line."""

    verbs: dict[str, argparse.ArgumentParser] = {}

    def parse_known_args(self, args=None, namespace=None):
        if args and args[0] in self.verbs:
            return self.verbs[args[0]].parse_known_args(args[1:], namespace)
        return super().parse_known_args(args, namespace)


def register(sub) -> None:
    p = sub.add_parser("trace", help="record a model's routing over a corpus (docs/TRACE.md)",
                       description="Stream the routing of N tokens to Parquet, in bounded memory. "
                                   "Also: `moelab trace import FORMAT SRC --out T` and "
                                   "`moelab trace export TRACE --format replay --out F` (see their --help).")
    parser_cls = type(p)  # the CLI's parser class (one-line usage errors), kept for the sub-verbs
    p.__class__ = type("TraceParser", (_TraceDispatch, parser_cls), {})  # dispatches its first word
    p.verbs = {"import": _import_parser(parser_cls), "export": _export_parser(parser_cls)}
    p.add_argument("model", nargs="?", help="a moelab checkpoint or run folder")
    p.add_argument("--hf", default=None, metavar="PATH_OR_NAME",
                   help="trace a Hugging Face MoE model instead (the families of docs/HF_SUPPORT.md)")
    p.add_argument("--revision", default=None, metavar="REV", help="--hf: a hub branch, tag or commit (OLMoE's checkpoints are branches); for a local folder, its subfolder of that name")
    p.add_argument("--device", default=None,
                   help="device to run on (default: --hf: cuda if available, else cpu; a checkpoint: cpu)")
    p.add_argument("--dtype", default="auto", help="--hf: auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--device-map", default=None, choices=["auto"],
                   help="--hf: spread a model larger than one device over all devices (needs accelerate)")
    p.add_argument("--data", required=True, help="corpus folder (moelab data build)")
    p.add_argument("--tokens", type=positive_int, default=65536, help="number of tokens to trace")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"])
    p.add_argument("--capacity-factor", default="eval",
                   help="eval (the config's evaluation factor), train, none (dropless) or a number")
    p.add_argument("--seq-len", type=positive_int, default=None, help="default: the checkpoint's training seq_len")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the checkpoint's batch size")
    p.add_argument("--all-experts", action="store_true",
                   help="also run every expert on each token (output norms, similarity, sparsity)")
    p.add_argument("--probs", type=probs_arg, default=None, metavar="full|top:N|none",
                   help="what to keep of each token's router distribution: full (all E, float16; the default), "
                        "top:N (the N largest with their experts, top_k <= N <= E) or none (only the chosen "
                        "experts' `prob`)")
    p.add_argument("--no-probs", action="store_true", help="the same as --probs none")
    p.add_argument("--out", required=True, help="trace file to write (.parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out trace")
    p.set_defaults(func=run_trace)


def probs_arg(text: str) -> str:
    """argparse type for --probs: a bad value is a one-line usage error (exit 2)."""
    from moelab.trace.schema import parse_probs

    try:
        return parse_probs(text)
    except MoelabError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--probs ")) from None  # keeps the bad value


def probs_mode(args) -> str:
    """--probs, with --no-probs as its older spelling of none."""
    if args.no_probs and args.probs not in (None, "none"):
        raise MoelabError(f"give --probs {args.probs} or --no-probs, not both")
    return "none" if args.no_probs else (args.probs or "full")


def _import_parser(parser_cls: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    from moelab.trace.formats import FORMATS

    p = parser_cls(prog="moelab trace import", description=(
        "Convert another tool's routing records into a moelab trace: megatron (Megatron-LM RouterTracer "
        "JSONL, a file or a folder of router_trace_rank*.jsonl), replay (int (tokens, layers, top_k) expert "
        "ids, -1 = none, from .npy or .safetensors), olmoe (OLMoE's routing-analysis JSONL). What a format "
        "lacks (probabilities, weights, token ids) is stored null."))
    p.add_argument("format", choices=FORMATS)
    p.add_argument("src", help="the file (or, for megatron, folder) to import")
    p.add_argument("--out", required=True, help="trace file to write (.parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out trace")
    p.add_argument("--num-experts", type=int, default=None,
                   help="experts per layer; default: inferred from the ids (largest + 1), with a note")
    p.add_argument("--corpus", default=None,
                   help="a moelab corpus supplying token ids (in order) where the format has none")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"], help="the corpus split")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="megatron: micro-batch size B; a router call's token t is row t %% B, position t // B")
    p.set_defaults(func=run_import)
    return p


def _export_parser(parser_cls: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_cls(prog="moelab trace export", description=(
        "Write a trace's routing in another tool's form: replay = int32 (tokens, layers, top_k) expert ids, "
        "-1 = none; .npy (one sequence, or a -1-padded batch) or .safetensors (packed, with token ids)."))
    p.add_argument("trace", help="a moelab trace (.parquet)")
    p.add_argument("--format", required=True, choices=["replay"])
    p.add_argument("--out", required=True, help="file to write: .npy or .safetensors")
    p.add_argument("--without-last-token", action="store_true",
                   help="leave out each sequence's last token, as an inference engine's array does")
    p.set_defaults(func=run_export)
    return p


def run_import(args) -> int:
    from moelab.trace.formats import import_trace

    stats = import_trace(args.format, args.src, args.out, num_experts=args.num_experts, corpus=args.corpus,
                         split=args.split, micro_batch=args.micro_batch, overwrite=args.overwrite)
    print(f"imported {stats['tokens']:,} tokens ({stats['rows']:,} rows, {stats['sequences']:,} sequences) "
          f"-> {args.out}")
    for name, why in stats["meta"].null_columns.items():
        print(f"note: column {name!r} is null: {why}")
    for note in stats["notes"]:
        print(f"note: {note}")
    return 0


def run_export(args) -> int:
    from moelab.trace.formats.replay import export_replay

    stats = export_replay(args.trace, args.out, drop_last=args.without_last_token)
    tokens = " with token ids" if stats["with_tokens"] else ""
    print(f"exported {stats['sequences']:,} sequences ({stats['tokens']:,} routed tokens){tokens} -> {args.out}")
    return 0


def parse_capacity(text: str, model_cfg) -> float | None:
    m = model_cfg.moe
    if text == "eval":
        return m.capacity_factor_eval
    if text == "train":
        return m.capacity_factor_train
    if text.lower() in ("none", "dropless"):
        return None
    try:
        cf = float(text)
    except ValueError:
        raise MoelabError(f"--capacity-factor {text!r} is not eval, train, none or a number") from None
    if not math.isfinite(cf) or cf <= 0:  # nan passes `<= 0`; inf is dropless spelled wrong: say none
        raise MoelabError(f"--capacity-factor {text!r} must be a finite number > 0 (or none for dropless)")
    return cf


def check_device_flags(args):
    """--device and --dtype of trace and intervene, refused in one line before any model loads; returns the
    torch.device --device names (None where it is not given)."""
    from moelab.device import resolve_device
    from moelab.trace.hf import _dtype

    _dtype(args.dtype)
    device = resolve_device(args.device, "--device") if args.device is not None else None
    if not args.hf and args.dtype not in ("auto", "float32", "fp32"):
        raise MoelabError(f"--dtype {args.dtype} applies to --hf models (a moelab checkpoint runs in float32)")
    return device


def run_trace(args) -> int:
    from moelab.trace.filemeta import check_trace_out

    # before any model loads: an existing folder or trace, an unwritable place, a sidecar's name
    check_trace_out(args.out, overwrite=args.overwrite)
    device = check_device_flags(args)
    if args.hf:
        from moelab.trace.hf import trace_hf

        if args.all_experts:
            raise MoelabError("--all-experts needs the model in moelab's form: "
                              "convert it first with `moelab convert --from-hf`, then trace the checkpoint")
        if args.model:
            raise MoelabError("give either a checkpoint or --hf NAME, not both")

        stats = trace_hf(args.hf, args.data, args.out, tokens=args.tokens, split=args.split,
                         seq_len=args.seq_len or 256, batch_size=args.batch_size or 8,
                         probs=probs_mode(args), device=args.device, dtype=args.dtype,
                         device_map=args.device_map, revision=args.revision)
    else:
        if args.revision:
            raise MoelabError("--revision applies to --hf models")
        if not args.model:
            raise MoelabError("give a checkpoint (or --hf NAME) to trace")
        stats = trace_checkpoint(args, device or "cpu")
    print(f"traced {stats['tokens']:,} tokens ({stats['rows']:,} rows) -> {args.out}")
    return 0


def trace_checkpoint(args, device) -> dict:
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.data.tokenizer import check_vocab_fits
    from moelab.train.checkpoint import checkpoint_data, checkpoint_step, load_model
    from moelab.train.commands import check_same_tokenizer, resolve_checkpoint
    from moelab.train.log import Progress
    from moelab.trace.build import trace_batches, trace_meta

    ckpt = resolve_checkpoint(args.model)
    model = load_model(ckpt, device)
    if not model.moe_layers():
        raise MoelabError(f"{ckpt} is a dense model: it has no routing to trace")
    if args.all_experts and any(layer.experts is None for layer in model.moe_layers()):
        raise MoelabError("--all-experts needs stacked experts that can run on every token")
    data = checkpoint_data(ckpt)
    corpus = load_corpus(args.data)
    check_vocab_fits(corpus.vocab_size, model.config.vocab_size)
    check_same_tokenizer(ckpt, corpus)
    seq_len = args.seq_len or data.get("seq_len", 256)
    batch_size = args.batch_size or data.get("batch_size", 8)
    if seq_len > model.config.max_seq_len:
        raise MoelabError(f"--seq-len {seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    cf = parse_capacity(args.capacity_factor, model.config)
    meta = trace_meta(model, cf, checkpoint_step(ckpt), str(Path(args.data) / "tokenizer.json"),
                      "moelab", corpus.domains, corpus.langs)
    meta.extra["batch_seqs"] = batch_size  # sequences per capacity batch: the queue-only drop baseline needs it
    batches = iter_sequential(corpus, seq_len=seq_len, batch_size=batch_size, split=args.split)
    bar = Progress(args.tokens, "trace")
    try:
        return trace_batches(model, batches, args.out, meta, max_tokens=args.tokens, capacity_factor=cf,
                             all_experts=args.all_experts, probs=probs_mode(args), progress=bar)
    finally:
        bar.close()
