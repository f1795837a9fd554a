"""`moelab train`, `moelab eval`, `moelab generate`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moelab.config import ConfigError, MoelabError
from moelab.presets import list_presets, load_preset_dict


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model on a corpus built by `moelab data build`")
    p.add_argument("--preset", required=True, help=f"model preset ({', '.join(list_presets())}) or .toml")
    p.add_argument("--data", required=True, help="corpus folder")
    p.add_argument("--out", default=None, help="run folder (default runs/PRESET)")
    p.add_argument("--steps", type=int, default=None, help="shorthand for --set train.steps=N")
    p.add_argument("--save-every", type=int, default=None, help="keep a checkpoint every N steps")
    p.add_argument("--resume", default=None, help="continue from this checkpoint folder")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="held-out loss and perplexity per domain")
    e.add_argument("checkpoint", help="a checkpoint folder or a run folder (its last checkpoint)")
    e.add_argument("--data", required=True, help="corpus folder")
    e.add_argument("--tokens", type=int, default=65536, help="at most this many tokens per domain")
    e.add_argument("--split", default="heldout", choices=["heldout", "train"])
    e.add_argument("--seq-len", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=8)
    e.set_defaults(func=run_eval)

    g = sub.add_parser("generate", help="continue a prompt with a trained model")
    g.add_argument("checkpoint", help="a checkpoint folder or a run folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=run_generate)


def build_run_config(preset: str, data: str, overrides: list[str]):
    from moelab.train.config import RunConfig

    d = load_preset_dict(preset, overrides)
    unknown = sorted(set(d) - {"model", "data", "train", "parallel"})
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r} (known: model, data, train, parallel)")
    d.setdefault("data", {})["path"] = data
    d["data"].setdefault("seq_len", min(256, d.get("model", {}).get("max_seq_len", 256)))
    return RunConfig.from_dict(d)


def run_train(args) -> int:
    from moelab.train.loop import train

    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    run = build_run_config(args.preset, args.data, overrides)
    if run.data.seq_len > run.model.max_seq_len:
        raise ConfigError(f"data.seq_len={run.data.seq_len} exceeds model.max_seq_len={run.model.max_seq_len}")
    out = Path(args.out or Path("runs") / Path(args.preset).stem)
    from moelab.distributed.mesh import is_main, shutdown

    try:
        result = train(run, out, resume_from=args.resume)
        if is_main():  # under torchrun only rank 0 reports
            print(f"trained {run.train.steps} steps at {result.tokens_per_second:,.0f} tokens/s")
            print(format_eval(result.eval))
            print(f"run folder: {out}\nfinal checkpoint: {result.final_checkpoint}")
    finally:
        shutdown()
    return 0



def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the last checkpoint of a run folder."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    steps = sorted((p / "checkpoints").glob("step_*")) if (p / "checkpoints").is_dir() else []
    steps = [s for s in steps if (s / "model.safetensors").is_file()]
    if steps:
        return steps[-1]
    if not p.exists():
        raise MoelabError(f"checkpoint not found: {p}")
    raise MoelabError(f"{p} is neither a checkpoint nor a run folder with checkpoints")


def format_eval(ev: dict) -> str:
    lines = [f"{'domain':<12}{'loss':>8}{'ppl':>10}{'tokens':>10}"]
    for dom, v in ev.items():
        lines.append(f"{dom:<12}{v['loss']:>8.3f}{v['ppl']:>10.1f}{v['tokens']:>10}")
    return "\n".join(lines)


def run_eval(args) -> int:
    from moelab.train.checkpoint import load_model, read_checkpoint_config
    from moelab.train.loop import evaluate

    ckpt = resolve_checkpoint(args.checkpoint)
    model = load_model(ckpt)
    from moelab.data.shards import load_corpus
    from moelab.data.tokenizer import check_vocab_fits

    check_vocab_fits(load_corpus(args.data).vocab_size, model.config.vocab_size)
    seq = args.seq_len or read_checkpoint_config(ckpt).get("data", {}).get("seq_len", 256)
    ev = evaluate(model, args.data, seq, args.batch_size, args.tokens, split=args.split)
    print(format_eval(ev))
    print(json.dumps(ev))
    return 0


def run_generate(args) -> int:
    from moelab.data.tokenizer import load_tokenizer
    from moelab.train.checkpoint import load_model, read_checkpoint_config

    ckpt = resolve_checkpoint(args.checkpoint)
    model = load_model(ckpt)
    data_path = read_checkpoint_config(ckpt).get("data", {}).get("path", "")
    tok_file = Path(data_path) / "tokenizer.json"
    if not tok_file.is_file():
        raise MoelabError(f"the checkpoint's corpus tokenizer {tok_file} is missing")
    tok = load_tokenizer(tok_file)
    ids = torch.tensor(tok.encode(args.prompt), dtype=torch.long)
    if ids.numel() == 0:
        raise MoelabError("the prompt encodes to no tokens")
    g = torch.Generator().manual_seed(args.seed)
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=g)
    print(tok.decode(out.tolist()))
    return 0
