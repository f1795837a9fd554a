"""`moelab convert`: transformers checkpoints <-> moelab checkpoints."""

from __future__ import annotations

from moelab.config import MoelabError, positive_float
from moelab.hf.families import FAMILIES


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a transformers MoE checkpoint to moelab, or back",
                       description="--from-hf: Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE -> a moelab checkpoint "
                                   "folder. --to-hf: a moelab checkpoint -> a transformers checkpoint that "
                                   "AutoModelForCausalLM loads. Weights stream tensor by tensor.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="PATH_OR_NAME", help="a transformers checkpoint folder or hub name")
    src.add_argument("--to-hf", metavar="CHECKPOINT", help="a moelab checkpoint or run folder")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--revision", default=None, metavar="REV", help="--from-hf: a hub branch, tag or commit (OLMoE's checkpoints are branches); for a local folder, its subfolder of that name")
    p.add_argument("--family", choices=FAMILIES, default=None,
                   help="with --to-hf: the transformers family to write (default: the first that fits)")
    p.add_argument("--max-shard-gb", type=positive_float, default=2.0,
                   help="with --to-hf: largest safetensors shard, in GiB")
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    from moelab.hf.convert import export_hf, import_hf

    if args.from_hf:
        if args.family:
            raise MoelabError("--family applies to --to-hf; --from-hf reads the family from config.json")
        out = import_hf(args.from_hf, args.out, revision=args.revision)
        print(f"converted {args.from_hf} -> moelab checkpoint {out}")
        return 0
    if args.revision:
        raise MoelabError("--revision applies to --from-hf")
    out = export_hf(args.to_hf, args.out, family=args.family, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    print(f"converted {args.to_hf} -> transformers checkpoint {out}")
    return 0
