"""`moelab trace`: stream a model's routing over a corpus into a Parquet trace."""

from __future__ import annotations

from pathlib import Path

from moelab.config import MoelabError


def register(sub) -> None:
    p = sub.add_parser("trace", help="record a model's routing over a corpus (docs/TRACE.md)",
                       description="Stream the routing of N tokens to Parquet, in bounded memory.")
    p.add_argument("model", nargs="?", help="a moelab checkpoint or run folder")
    p.add_argument("--hf", default=None, metavar="PATH_OR_NAME",
                   help="trace a Hugging Face MoE model instead (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...)")
    p.add_argument("--data", required=True, help="corpus folder (moelab data build)")
    p.add_argument("--tokens", type=int, default=65536, help="number of tokens to trace")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"])
    p.add_argument("--capacity-factor", default="eval",
                   help="eval (the config's evaluation factor), train, none (dropless) or a number")
    p.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint's training seq_len")
    p.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's batch size")
    p.add_argument("--all-experts", action="store_true",
                   help="also run every expert on each token (output norms, similarity, sparsity)")
    p.add_argument("--no-probs", action="store_true", help="leave out the full router probabilities")
    p.add_argument("--out", required=True, help="trace file to write (.parquet)")
    p.set_defaults(func=run_trace)


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
    if cf <= 0:
        raise MoelabError(f"--capacity-factor {cf} must be > 0")
    return cf


def run_trace(args) -> int:
    if args.tokens < 1:
        raise MoelabError(f"--tokens {args.tokens} must be >= 1")
    if args.hf:
        from moelab.trace.hf import trace_hf

        if args.all_experts:
            raise MoelabError("--all-experts needs the model in moelab's form: "
                              "convert it first with `moelab convert --from-hf`, then trace the checkpoint")
        if args.model:
            raise MoelabError("give either a checkpoint or --hf NAME, not both")

        stats = trace_hf(args.hf, args.data, args.out, tokens=args.tokens, split=args.split,
                         seq_len=args.seq_len or 256, batch_size=args.batch_size or 8,
                         full_probs=not args.no_probs)
    else:
        if not args.model:
            raise MoelabError("give a checkpoint (or --hf NAME) to trace")
        stats = trace_checkpoint(args)
    print(f"traced {stats['tokens']:,} tokens ({stats['rows']:,} rows) -> {args.out}")
    return 0


def trace_checkpoint(args) -> dict:
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.data.tokenizer import check_vocab_fits
    from moelab.train.checkpoint import checkpoint_step, load_model, read_checkpoint_config
    from moelab.train.commands import resolve_checkpoint
    from moelab.train.log import Progress
    from moelab.trace.build import trace_batches, trace_meta

    ckpt = resolve_checkpoint(args.model)
    model = load_model(ckpt)
    if not model.moe_layers():
        raise MoelabError(f"{ckpt} is a dense model: it has no routing to trace")
    if args.all_experts and any(layer.experts is None for layer in model.moe_layers()):
        raise MoelabError("--all-experts needs stacked experts that can run on every token")
    run = read_checkpoint_config(ckpt)
    corpus = load_corpus(args.data)
    check_vocab_fits(corpus.vocab_size, model.config.vocab_size)
    seq_len = args.seq_len or run.get("data", {}).get("seq_len", 256)
    batch_size = args.batch_size or run.get("data", {}).get("batch_size", 8)
    cf = parse_capacity(args.capacity_factor, model.config)
    meta = trace_meta(model, cf, checkpoint_step(ckpt), str(Path(args.data) / "tokenizer.json"),
                      "moelab", corpus.domains, corpus.langs)
    meta.extra["batch_seqs"] = batch_size  # sequences per capacity batch: the queue-only drop baseline needs it
    batches = iter_sequential(corpus, seq_len=seq_len, batch_size=batch_size, split=args.split)
    bar = Progress(args.tokens, "trace")
    try:
        return trace_batches(model, batches, args.out, meta, max_tokens=args.tokens, capacity_factor=cf,
                             all_experts=args.all_experts, full_probs=not args.no_probs, progress=bar)
    finally:
        bar.close()
