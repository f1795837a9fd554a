"""`moelab params PRESET`: analytic parameter counts per part, beside the published figures."""

from __future__ import annotations

from moelab.presets import list_presets, load_preset, preset_reference

PARTS = ["embeddings", "attention", "dense_ffn", "routed_experts", "shared_experts", "routers", "norms"]


def register(sub) -> None:
    p = sub.add_parser("params", help="total and active parameters of a preset, per part",
                       description="Analytic parameter counts (no weights are allocated).")
    p.add_argument("preset", help=f"a preset name ({', '.join(list_presets())}) or a .toml path")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. model.moe.num_experts=64 (repeatable)")
    p.set_defaults(func=run_params)


def human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_params(cfg, reference: dict) -> str:
    counts = cfg.param_counts()
    lines = [f"{'part':<16}{'total':>14}{'active':>14}"]
    for part in PARTS:
        c = counts[part]
        lines.append(f"{part:<16}{c['total']:>14,}{c['active']:>14,}")
    a = counts["all"]
    lines.append(f"{'all':<16}{a['total']:>14,}{a['active']:>14,}   ({human(a['total'])} / {human(a['active'])})")
    emb = counts["embeddings"]["total"]
    lines.append(f"{'non-embedding':<16}{a['total'] - emb:>14,}{a['active'] - emb:>14,}")
    moe_ids = cfg.moe_layer_ids()
    lines.append(f"MoE blocks: {moe_ids or 'none'}; experts per MoE layer: {cfg.experts_per_layer() or '-'}; "
                 f"top-{cfg.moe.top_k}; shared experts: {cfg.num_shared}")
    if reference.get("total_params"):
        lines.append(f"paper: {human(reference['total_params'])} total / "
                     f"{human(reference['active_params'])} active ({reference.get('source', '')})")
        if reference.get("note"):
            lines.append(f"note: {reference['note']}")
    return "\n".join(lines)


def run_params(args) -> int:
    cfg = load_preset(args.preset, args.set)
    print(f"preset {args.preset}")
    print(format_params(cfg, preset_reference(args.preset)))
    return 0
