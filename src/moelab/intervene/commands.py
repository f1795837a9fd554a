"""`moelab intervene CKPT|--hf MODEL --data DIR --out DIR`: expert ablation, top-k and capacity sweeps over a corpus;
`moelab diff T1 T2`: how two traces of the same tokens route differently. Results: JSON (+ Parquet deltas)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from moelab.analysis.common import plain
from moelab.config import MoelabError, positive_int

ABLATE_HELP = ("BLOCK:E (one expert), BLOCK:E,E,... (those experts removed together) or BLOCK:all (every "
               "expert of the block, one at a time); BLOCK is the transformer block index; repeatable")


def register(sub) -> None:
    p = sub.add_parser("intervene", help="causal tests: ablate experts, sweep top-k and capacity",
                       description="Change routing from outside and measure the loss per domain and language, "
                                   "with 95% bootstrap intervals over sequences. Works on a moelab checkpoint "
                                   "or, with --hf, on a transformers MoE model edited by hooks (no conversion).")
    p.add_argument("model", nargs="?", help="a moelab checkpoint or run folder (or give --hf)")
    p.add_argument("--hf", default=None, metavar="PATH_OR_NAME",
                   help="a transformers MoE model (folder or hub name), edited by hooks without converting it; "
                        "the corpus must be built with its tokenizer")
    p.add_argument("--revision", default=None, metavar="REV", help="--hf: a hub branch, tag or commit (OLMoE's checkpoints are branches); for a local folder, its subfolder of that name")
    p.add_argument("--device", default=None, help="--hf: device to run on (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="--hf: auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--data", required=True, help="corpus folder (moelab data build)")
    p.add_argument("--out", required=True, help="folder for intervene.json (and ablation_deltas.parquet)")
    p.add_argument("--ablate", action="append", default=[], metavar="SPEC", help=ABLATE_HELP)
    p.add_argument("--prune-by", default=None, choices=["frequency", "gate_weighted", "activation_norm", "reap",
                                                        "causal"],
                   help="with BLOCK:all ablations: loss when the m lowest-scoring experts of those blocks go")
    p.add_argument("--naee-keep", type=positive_int, default=None, metavar="N",
                   help="for each block named in --ablate (<= 8 experts): try every set of N experts to keep (NAEE)")
    p.add_argument("--replay", default=None, metavar="FILE",
                   help="re-run with routing from a trace (.parquet) or replay array (.npy/.safetensors); "
                        "sequence i replays corpus row i; -1 or a missing last token routes normally")
    p.add_argument("--topk-sweep", action="store_true", help="loss for k = 1..E; k=1 vs full-k output cosines")
    p.add_argument("--capacity-sweep", default=None, metavar="CF,...",
                   help="capacity factors to try, e.g. 0.5,1,1.25,2,none (none = dropless); not with --hf "
                        "(transformers MoE blocks are dropless)")
    p.add_argument("--policies", default="openmoe,score", help="drop policies for --capacity-sweep")
    p.add_argument("--tokens", type=positive_int, default=65536, help="predicted tokens to use")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"])
    p.add_argument("--capacity-factor", default="eval",
                   help="the run's capacity: eval (the config's), train, none (dropless) or a number "
                        "(moelab checkpoints only)")
    p.add_argument("--ablate-capacity", default="recompute", choices=["recompute", "keep"],
                   help="capacity of an ablated layer: recompute (default; slots from the experts left, as a "
                        "model built without them) or keep (slots from all E experts, the mask alone)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="default: the checkpoint's training seq_len (--hf: 256)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="default: the checkpoint's batch size (--hf: 8)")
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples per interval")
    p.add_argument("--flips", type=positive_int, default=None, metavar="N",
                   help="sign flips per ablation p-value (default: 20 x ablations / 0.05, at least 2000, so "
                        "Holm's floor sits at 0.0025; with 2^sequences <= N the test is exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier result in a non-empty --out (otherwise intervene refuses it, "
                        "as train, demo and upcycle do)")
    p.set_defaults(func=run_intervene)

    d = sub.add_parser("diff", help="compare the routing of two traces of the same tokens",
                       description="Per layer: top-1 agreement, top-k Jaccard vs chance, flips by router margin, "
                                   "domain and position; the share of tokens routed differently anywhere.")
    d.add_argument("trace_a")
    d.add_argument("trace_b")
    d.add_argument("--out", default=None, help="write the result as JSON here")
    d.set_defaults(func=run_diff)


def parse_ablate(specs: list[str], num_experts: dict[int, int]) -> list[tuple[int, tuple[int, ...]]]:
    """'1:3' / '1:3,5' / '1:all' -> [(block, experts masked together), ...], grouped by block."""
    targets = []
    for spec in specs:
        block_text, sep, experts_text = spec.partition(":")
        try:
            block = int(block_text)
            experts = (None if experts_text == "all" else tuple(int(e) for e in experts_text.split(",")))
        except ValueError:
            raise MoelabError(f"--ablate {spec!r} is not BLOCK:E, BLOCK:E,E,... or BLOCK:all") from None
        if not sep:
            raise MoelabError(f"--ablate {spec!r} is not BLOCK:E, BLOCK:E,E,... or BLOCK:all")
        if block not in num_experts:
            raise MoelabError(f"--ablate {spec!r}: block {block} is not an MoE layer "
                              f"(MoE blocks: {sorted(num_experts)})")
        E = num_experts[block]
        bad = [e for e in experts or () if not 0 <= e < E]
        if bad:
            raise MoelabError(f"--ablate {spec!r}: expert {bad[0]} is out of range (block {block} has "
                              f"experts 0..{E - 1})")
        twice = [e for i, e in enumerate(experts or ()) if e in experts[:i]]
        if twice:
            raise MoelabError(f"--ablate {spec!r}: expert {twice[0]} is named twice")
        targets += [(block, (e,)) for e in range(E)] if experts is None else [(block, experts)]
    return sorted(targets, key=lambda t: t[0])


def parse_factors(text: str) -> list[float | None]:
    out = []
    for part in text.split(","):
        if part.strip().lower() in ("none", "dropless"):
            out.append(None)
            continue
        try:
            cf = float(part)
        except ValueError:
            raise MoelabError(f"--capacity-sweep {part!r} is not a number or none") from None
        if not math.isfinite(cf) or cf <= 0:  # nan passes `<= 0`; inf is dropless spelled wrong: say none
            raise MoelabError(f"--capacity-sweep {part.strip()!r} must be a finite number > 0 or none")
        out.append(cf)
    return out


def _check_out_empty(out: Path, overwrite: bool) -> None:
    """The rule of train, demo and upcycle: an earlier result is never replaced silently."""
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MoelabError(f"--out {out} is not empty (an earlier result?): pass --overwrite to replace it")


def _check_capacity_text(text: str) -> None:
    """--capacity-factor nan/inf would pass parse_capacity's `<= 0` and fail deep in the model."""
    try:
        cf = float(text)
    except ValueError:
        return  # eval, train, none and typos: parse_capacity names them
    if not math.isfinite(cf):
        raise MoelabError(f"--capacity-factor {text!r} must be a finite number > 0 (or none for dropless)")


def _open(args):
    """(source, model, batches, cf, label names, runner module, load) of a moelab checkpoint or, with --hf, a
    transformers model. With --hf the model is first built without weights (enough for every check) and
    `load()` reads them; for a checkpoint `load()` returns the model."""
    if args.hf:
        if args.model:
            raise MoelabError("give either a checkpoint or --hf NAME, not both")
        return _open_hf(args)
    if args.revision:
        raise MoelabError("--revision applies to --hf models")
    if not args.model:
        raise MoelabError("give a checkpoint (or --hf NAME) to intervene on")
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.data.tokenizer import check_vocab_fits
    from moelab.intervene import runner
    from moelab.intervene.study import take_batches
    from moelab.trace.commands import parse_capacity
    from moelab.train.checkpoint import checkpoint_data, load_model
    from moelab.train.commands import check_same_tokenizer, resolve_checkpoint

    ckpt = resolve_checkpoint(args.model)
    model = load_model(ckpt).eval()
    if not model.moe_layers():
        raise MoelabError(f"{ckpt} is a dense model: it has no routing to intervene on")
    corpus = load_corpus(args.data)
    check_vocab_fits(corpus.vocab_size, model.config.vocab_size)
    check_same_tokenizer(ckpt, corpus)
    data = checkpoint_data(ckpt)
    seq_len = args.seq_len or data.get("seq_len", 256)
    if seq_len > model.config.max_seq_len:
        raise MoelabError(f"--seq-len {seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    batches = iter_sequential(corpus, seq_len=seq_len, batch_size=args.batch_size or data.get("batch_size", 8),
                              split=args.split)
    cf = parse_capacity(args.capacity_factor, model.config)
    names = {"domain": list(corpus.domains), "lang": list(corpus.langs)}
    return str(ckpt), model, take_batches(batches, args.tokens), cf, names, runner, lambda: model


def _open_hf(args):
    """As `trace --hf` loads: the family checked on a weightless build, the tokenizer against the corpus."""
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.hf.families import read_hf_config
    from moelab.hf.hub import resolve_hf
    from moelab.intervene import hf_runner
    from moelab.intervene.hf_edit import hf_moe
    from moelab.intervene.study import take_batches
    from moelab.trace.hf import check_tokenizer, config_vocab, load_hf_model, preflight

    if args.capacity_sweep or args.capacity_factor != "eval":
        flag = "--capacity-sweep" if args.capacity_sweep else "--capacity-factor"
        raise MoelabError(f"{flag} with --hf: transformers MoE blocks are dropless (no capacity to set or "
                          "sweep); convert the model with `moelab convert --from-hf` for capacity studies")
    folder = resolve_hf(args.hf, args.revision)
    raw = read_hf_config(folder)
    meta = preflight(folder, raw.get("model_type"))
    hf_moe(meta, raw.get("model_type"))  # a family moelab cannot edit
    corpus = load_corpus(args.data)
    check_tokenizer(folder, Path(args.data), corpus, config_vocab(raw))
    batches = iter_sequential(corpus, seq_len=args.seq_len or 256, batch_size=args.batch_size or 8,
                              split=args.split)
    names = {"domain": list(corpus.domains), "lang": list(corpus.langs)}

    def load():
        from transformers.utils import logging

        shown = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()  # a refusal after loading stays one line
        try:
            return load_hf_model(folder, args.device, dtype=args.dtype)
        finally:
            if shown:
                logging.enable_progress_bar()

    return f"hf:{args.hf}", meta, take_batches(batches, args.tokens), None, names, hf_runner, load


def run_intervene(args) -> int:
    from moelab.intervene.tables import format_ablation, write_deltas
    from moelab.outpath import check_writable_dir

    check_writable_dir(args.out)
    _check_out_empty(Path(args.out), args.overwrite)
    _check_capacity_text(args.capacity_factor)
    from moelab.trace.commands import check_device_flags

    device = check_device_flags(args)  # before any model loads (--hf's load comes after every other check)
    if not args.hf and device is not None and device.type != "cpu":  # not silently ignored
        raise MoelabError(f"--device {args.device} applies to --hf models: intervene runs a moelab checkpoint "
                          "on the CPU")
    if not (args.ablate or args.topk_sweep or args.capacity_sweep or args.replay):
        raise MoelabError("nothing to do: give --ablate, --replay, --topk-sweep and/or --capacity-sweep")
    factors = parse_factors(args.capacity_sweep) if args.capacity_sweep else []
    policies = [p.strip() for p in args.policies.split(",")]
    from moelab.model.capacity import POLICIES

    if any(p not in POLICIES for p in policies):
        raise MoelabError(f"--policies {args.policies!r}: allowed are {', '.join(POLICIES)}")
    source, model, batches, cf, names, ops, load = _open(args)
    layout = ops.layout(model)  # MoE block -> (experts, top_k)
    targets = parse_ablate(args.ablate, {b: E for b, (E, _) in layout.items()})
    _check_naee(args, layout, targets)
    if args.prune_by and not any(len(e) == 1 for _, e in targets):
        raise MoelabError("--prune-by needs the experts of a block ablated one at a time (--ablate BLOCK:all)")
    replay = None
    if args.replay:  # checked before any work or output: another model's or other tokens' routing
        from moelab.intervene.study import prepare_replay

        replay = prepare_replay(model, batches, args.replay)
    model = load()
    result = {"checkpoint": source, "capacity_factor": cf, "split": args.split, "bootstrap": args.bootstrap,
              # dropless (--hf, or capacity none) makes the two the same model
              "ablate_capacity": args.ablate_capacity}
    out = Path(args.out)
    if targets:
        from moelab.intervene.stats import flips_for_family
        from moelab.intervene.study import ablation_results, run_ablation

        tokens, base, deltas = run_ablation(model, batches, targets, cf, ops=ops,
                                            ablate_capacity=args.ablate_capacity)
        result["tokens"] = len(base)
        result["ablation"] = ablation_results(tokens, deltas, targets, names, args.bootstrap, args.seed,
                                              args.flips)
        result["flips"] = args.flips or flips_for_family(len(targets))
        print(format_ablation(result["ablation"]))
        result.update(_observational(args, model, batches, cf, tokens, deltas, targets, ops))
        if args.naee_keep:
            result["naee"] = _naee(args, model, batches, cf, names, targets, ops)
    if args.replay:
        result["replay"] = _replay(args, model, batches, replay, cf, names, ops)
    result.update(_sweeps(args, model, batches, cf, names, factors, policies, ops))
    out.mkdir(parents=True, exist_ok=True)  # outputs only once every number is in
    if targets:
        write_deltas(out / "ablation_deltas.parquet", tokens, base, deltas, targets, names)
    else:  # --overwrite: an earlier run's deltas must not sit beside a result they do not belong to
        (out / "ablation_deltas.parquet").unlink(missing_ok=True)
    _write_json(out / "intervene.json", result)
    print(f"-> {out / 'intervene.json'}")
    return 0


def _replay(args, model, batches, replay, cf, names, ops) -> dict:
    from moelab.intervene.study import run_replay

    rep = run_replay(model, batches, replay, cf, names, args.bootstrap, args.seed, ops)
    cov = rep["coverage"]
    print(f"replay of {args.replay}: {rep['routes_changed']:.4f} of the {cov['routes']} (token, layer) routes it "
          f"covers changed (coverage {cov['share']:.3f} of {cov['of']} in the run); loss "
          f"{rep['loss']['all']['mean']:.4f}, change {rep['delta']['all']['mean']:+.4f} "
          f"[{rep['delta']['all']['lo']:+.4f}, {rep['delta']['all']['hi']:+.4f}]")
    return rep


def _observational(args, model, batches, cf, tokens, deltas, targets, ops) -> dict:
    """Blocks whose every expert was ablated alone: observational vs causal ranks, and the pruning curve."""
    from moelab.intervene.observe import obs_vs_causal, observe, pruning_curve, scores_from
    from moelab.intervene.tables import format_observational

    E = {b: ops.layout(model)[b][0] for b, _ in targets}
    rows = {b: {e[0]: i for i, (bb, e) in enumerate(targets) if bb == b and len(e) == 1} for b in E}
    full = [b for b in E if len(rows[b]) == E[b]]
    if not full:
        return {}
    sums = observe(model, batches, cf, ops)
    result = {"observational_vs_causal": {}}
    order = {}
    for b in full:
        d_EN = deltas[[rows[b][e] for e in range(E[b])]]
        r = obs_vs_causal(sums[b], tokens.seq, d_EN, args.bootstrap, args.seed)
        result["observational_vs_causal"][str(b)] = r
        score = r["causal_effect"] if args.prune_by in (None, "causal") else scores_from(sums[b])[args.prune_by]
        order[b] = [int(e) for e in np.argsort(np.asarray(score), kind="stable")]
    print(format_observational(result["observational_vs_causal"]))
    if args.prune_by:
        curve = pruning_curve(model, batches, order, cf, ops, args.ablate_capacity)
        result["pruning"] = {"by": args.prune_by, "blocks": full, "curve": curve}
        print("pruning by " + args.prune_by + ": " + "  ".join(
            f"m={c['removed_per_layer']}: {c['loss']:.4f}" for c in result["pruning"]["curve"]))
    return result


def _check_naee(args, layout, targets) -> None:
    for block in {b for b, _ in targets} if args.naee_keep else ():
        E, k = layout[block]
        if E > 8 or not k <= args.naee_keep < E:
            raise MoelabError(f"--naee-keep {args.naee_keep}: block {block} has {E} experts, top-{k} (the search "
                              f"needs E <= 8 and top_k <= N < E)")


def _naee(args, model, batches, cf, names, targets, ops) -> dict:
    from moelab.intervene.study import naee_best, naee_targets, run_ablation

    out = {}
    for block in sorted({b for b, _ in targets}):
        E = ops.layout(model)[block][0]
        subsets = naee_targets(block, E, args.naee_keep)
        tokens, _, deltas = run_ablation(model, batches, subsets, cf, ops=ops,
                                        ablate_capacity=args.ablate_capacity)
        out[str(block)] = best = naee_best(tokens, deltas, subsets, names, args.bootstrap, args.seed)
        print(f"NAEE block {block}: keep {args.naee_keep} of {E}, best removes {best['removed']}: "
              f"{best['effect']['all']['mean']:+.4f} [{best['effect']['all']['lo']:+.4f}, "
              f"{best['effect']['all']['hi']:+.4f}] over {len(subsets)} subsets")
    return out


def _sweeps(args, model, batches, cf, names, factors, policies, ops) -> dict:
    from moelab.intervene.study import capacity_edits, cosine_study, run_sweep, topk_edits
    from moelab.intervene.tables import format_sweep

    result = {}
    if args.topk_sweep:
        result["topk"] = run_sweep(model, batches, topk_edits(ops.max_top_k(model)), cf, names, args.bootstrap,
                                   args.seed, ops)
        result["k1_cosine"] = {str(b): v for b, v in cosine_study(model, batches, cf, ops).items()}
        print(format_sweep(result["topk"], "top-k sweep"))
    if factors:
        edits = capacity_edits(factors, policies)  # policies checked by edit_routing
        result["capacity"] = run_sweep(model, batches, edits, cf, names, args.bootstrap, args.seed, ops)
        print(format_sweep(result["capacity"], "capacity sweep"))
    return result


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # plain(): NaN (an interval with no sequences behind it) as JSON null, which every reader accepts
    tmp.write_text(json.dumps(plain(obj), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def run_diff(args) -> int:
    from moelab.intervene.diff import diff_traces, format_diff

    if args.out:
        from moelab.outpath import check_out_file

        check_out_file(args.out)
    result = diff_traces(args.trace_a, args.trace_b)
    print(format_diff(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # as the other verbs' --out
        _write_json(Path(args.out), result)
        print(f"-> {args.out}")
    return 0
