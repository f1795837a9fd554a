"""`moelab train`, `moelab eval`, `moelab generate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from moelab.config import ConfigError, MoelabError, positive_int, seed_int
from moelab.presets import list_presets, load_preset_dict
# Lives below train, upcycle and every verb that reads checkpoints (no import circle through this file);
# kept importable from here, where other verbs have always found it.
from moelab.train.rundir import resolve_checkpoint  # noqa: F401


def __getattr__(name: str):
    if name == "check_same_tokenizer":  # lazily: checkpoint.py imports torch, and every verb imports this file
        from moelab.train.checkpoint import check_same_tokenizer

        return check_same_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model on a corpus built by `moelab data build`")
    p.add_argument("--preset", required=True, help=f"model preset ({', '.join(list_presets())}) or .toml")
    p.add_argument("--data", required=True, help="corpus folder")
    p.add_argument("--out", default=None, help="run folder (default runs/PRESET)")
    p.add_argument("--steps", type=int, default=None, help="shorthand for --set train.steps=N")
    p.add_argument("--save-every", type=int, default=None, help="keep a checkpoint every N steps (0: only the final one)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint folder (into --out, which "
                   "may then hold the run being continued)")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start at step 0 from this checkpoint's weights and model config (e.g. one written "
                        "by `moelab upcycle`); the preset gives the train and data settings")
    p.add_argument("--overwrite", action="store_true",
                   help="empty a non-empty --out first (otherwise train refuses it, so two runs never mix)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--replay", default=None, metavar="FILE",
                   help="train under router replay: batches are the sequences of this trace (.parquet) or "
                        "replay array (.npy/.safetensors) in order, sequence i = row i of --replay-split at "
                        "data.seq_len, repeated as epochs; their routing is forced, weights from the router")
    p.add_argument("--replay-split", default="heldout", choices=["heldout", "train"],
                   help="the corpus split the replay was recorded over (trace's --split)")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="held-out loss and perplexity per domain")
    e.add_argument("checkpoint", help="a checkpoint folder or a run folder (its last checkpoint)")
    e.add_argument("--data", required=True, help="corpus folder")
    e.add_argument("--tokens", type=positive_int, default=65536, help="at most this many tokens per domain")
    e.add_argument("--split", default="heldout", choices=["heldout", "train"])
    e.add_argument("--seq-len", type=positive_int, default=None, help="default: the checkpoint's training seq_len")
    e.add_argument("--batch-size", type=positive_int, default=8)
    e.add_argument("--device", default="cpu",
                   help="cpu (default), cuda, cuda:N or auto; on a GPU with bf16 units under bf16 autocast, "
                        "as train's own evaluation there (train.dtype=auto)")
    e.set_defaults(func=run_eval)

    g = sub.add_parser("generate", help="continue a prompt with a trained model")
    g.add_argument("checkpoint", help="a checkpoint folder or a run folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (>= 1)")
    g.add_argument("--seed", type=seed_int, default=0)
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json (or folder) to use; default: the one of the corpus the model trained on")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto (a seed samples other "
                                                   "tokens on a GPU than on the CPU: their generators differ)")
    g.set_defaults(func=run_generate)


def build_run_config(preset: str, data: str, overrides: list[str], model: dict | None = None):
    """The run config: preset, then (for --init) the checkpoint's model table, then the overrides."""
    from moelab.config import apply_overrides
    from moelab.train.config import RunConfig

    d = load_preset_dict(preset)
    d.pop("upcycle", None)  # `moelab upcycle`'s options may share the MoE preset
    if model is not None:
        d["model"] = model
    d = apply_overrides(d, overrides)
    unknown = sorted(set(d) - {"model", "data", "train", "parallel"})
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r} (known: model, data, train, parallel)")
    for section in ("model", "data"):
        if not isinstance(d.setdefault(section, {}), dict):
            raise ConfigError(f"{section} is a config section, not a value ({d[section]!r})")
    # Resolved, so a checkpoint finds its corpus (and tokenizer) from any working directory.
    d["data"]["path"] = str(Path(data).expanduser().resolve())
    max_len = d["model"].get("max_seq_len", 256)
    d["data"].setdefault("seq_len", min(256, max_len) if type(max_len) is int else 256)
    return RunConfig.from_dict(d)


def run_train(args) -> int:
    from moelab.train.loop import train

    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    init_model = None
    if args.init is not None:
        from moelab.train.checkpoint import read_checkpoint_config

        args.init = resolve_checkpoint(args.init)
        init_model = read_checkpoint_config(args.init)["model"]
    run = build_run_config(args.preset, args.data, overrides, model=init_model)
    if run.data.seq_len > run.model.max_seq_len:
        raise ConfigError(f"data.seq_len={run.data.seq_len} exceeds model.max_seq_len={run.model.max_seq_len}")
    out = Path(args.out or Path("runs") / Path(args.preset).stem)
    from moelab.distributed.mesh import is_main, shutdown

    try:
        result = train(run, out, resume_from=args.resume, overwrite=args.overwrite, init_from=args.init,
                       replay=args.replay, replay_split=args.replay_split)
        if is_main():  # under torchrun only rank 0 reports
            print(f"trained {run.train.steps} steps at {result.tokens_per_second:,.0f} tokens/s")
            print(format_eval(result.eval))
            print(f"run folder: {out}\nfinal checkpoint: {result.final_checkpoint}")
    finally:
        shutdown()
    return 0


def format_eval(ev: dict) -> str:
    lines = [f"{'domain':<12}{'loss':>8}{'ppl':>10}{'tokens':>10}"]
    for dom, v in ev.items():
        lines.append(f"{dom:<12}{v['loss']:>8.3f}{v['ppl']:>10.1f}{v['tokens']:>10}")
    return "\n".join(lines)


def run_eval(args) -> int:
    from moelab.data.shards import load_corpus
    from moelab.data.tokenizer import check_vocab_fits
    from moelab.device import resolve_device
    from moelab.train.checkpoint import check_same_tokenizer, checkpoint_data, load_model
    from moelab.train.loop import autocast_for, evaluate

    device = resolve_device(args.device, "--device")
    ckpt = resolve_checkpoint(args.checkpoint)
    model = load_model(ckpt)
    corpus = load_corpus(args.data)
    if not len(corpus.doc_ids(args.split)):  # else an empty table and {}, exit 0
        raise MoelabError(f"corpus {args.data} has no documents in split {args.split!r}"
                          + (" (built with --heldout-fraction 0?)" if args.split == "heldout" else ""))
    check_vocab_fits(corpus.vocab_size, model.config.vocab_size)
    check_same_tokenizer(ckpt, corpus)
    seq = args.seq_len or checkpoint_data(ckpt).get("seq_len", 256)
    if seq > model.config.max_seq_len:
        raise MoelabError(f"--seq-len {seq} exceeds the model's max_seq_len={model.config.max_seq_len}")
    ev = evaluate(model.to(device), args.data, seq, args.batch_size, args.tokens, split=args.split,
                  amp=autocast_for(device, "auto"))
    if not ev:
        raise MoelabError(f"corpus {args.data} has no tokens to score in split {args.split!r}")
    print(format_eval(ev))
    print(json.dumps(ev))
    return 0


def generation_tokenizer(ckpt: Path, given: str | None):
    """--tokenizer, or the tokenizer of the corpus the checkpoint trained on; checked against it."""
    from moelab.data.tokenizer import load_tokenizer
    from moelab.train.checkpoint import checkpoint_data, read_checkpoint_config

    saved = read_checkpoint_config(ckpt).get("tokenizer", {})
    if given is None:
        tok_file = Path(saved.get("file") or Path(checkpoint_data(ckpt).get("path", "")) / "tokenizer.json")
        if not tok_file.exists():
            raise MoelabError(f"the checkpoint's corpus tokenizer {tok_file} is missing: pass --tokenizer PATH")
        given = str(tok_file)
    tok = load_tokenizer(given)
    if saved.get("fingerprint") and tok.fingerprint() != saved["fingerprint"]:
        raise MoelabError(f"tokenizer {given} is not the one checkpoint {ckpt} trained with "
                          f"(fingerprint {tok.fingerprint()} vs {saved['fingerprint']})")
    return tok


def run_generate(args) -> int:
    import torch  # here, not at the top: every `moelab` verb imports this module to build its parser

    from moelab.device import resolve_device
    from moelab.train.checkpoint import load_model

    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise MoelabError(f"--temperature {args.temperature} must be a finite number >= 0 (0: greedy)")
    if args.top_k < 1:
        raise MoelabError(f"--top-k {args.top_k} must be >= 1")
    device = resolve_device(args.device, "--device")
    ckpt = resolve_checkpoint(args.checkpoint)
    model = load_model(ckpt, device)
    tok = generation_tokenizer(ckpt, args.tokenizer)
    ids = torch.tensor(tok.encode(args.prompt), dtype=torch.long)
    if ids.numel() == 0:
        raise MoelabError("the prompt encodes to no tokens")
    if int(ids.max()) >= model.config.vocab_size:
        raise MoelabError(f"the tokenizer gives ids up to {int(ids.max())}, beyond the model's vocab_size")
    g = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(ids.to(device), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=g)
    print(tok.decode(out.tolist()))
    return 0
