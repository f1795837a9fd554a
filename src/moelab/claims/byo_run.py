"""`benchmarks/claims.py --hf PATH [PATH...]`: the one-model rows on brought models, into a scratch folder.

Results (one JSON per row, as the table's) and a CLAIMS.md naming the models and their fingerprints go to
`out` (default claims-scratch/hf/<final model>/): never docs/, whose numbers are the table's own models.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from moelab.claims.fingerprint import SRC
from moelab.claims.byo import Brought, check_together, corpus_for, pairs, resolve, seq_len_for, tokenizer_of, trace_of
from moelab.claims.record import ClaimResult, write_result, write_text_atomic
from moelab.claims.workspace import Workspace

ONE_CHECKPOINT = "one checkpoint given: saturation compares earlier checkpoints with the final one (give several)"


SEEDS_NOT_CHECKPOINTS = "--seeds: the models are separate training runs, not checkpoints of one run"


def describe(models: Sequence[Brought], tok, tokens: int, seq_len: int, seeds: bool = False) -> str:
    f = models[-1]
    if seeds:
        which = f"{len(models)} independently trained models (seeds): " + "; ".join(
            f"{m.label} ({m.kind}, fingerprint {m.fingerprint})" for m in models)
    else:
        ckpts = "" if len(models) == 1 else f"{len(models)} checkpoints in the order given, the last final; "
        which = f"{ckpts}final model {f.label} ({f.kind}, fingerprint {f.fingerprint})"
    return (f"{which}; {len(f.experts)} MoE layers, top-{f.top_k} of {max(f.experts)} experts. The claims corpus's "
            f"held-out split tokenized by the model's own tokenizer ({tok.source}, fingerprint {tok.fingerprint()}), "
            f"{tokens:,} tokens traced in sequences of {seq_len}.")


def run_byo(paths: Sequence[str], ws: Workspace, out: str | Path | None = None, *, revisions: Sequence[str] = (),
            tokens: int = 0, command: str = "", seeds: bool = False) -> tuple[Path, list[ClaimResult], dict[str, str]]:
    """Run the one-model rows; returns (the results folder, the results, the rows not measured and why).

    `seeds`: the models are independent training runs of one recipe, not checkpoints: the single-model
    rows run on each and take the table's interval over seeds (3 or more sign a verdict)."""
    from moelab.claims.byo_rows import over_seeds, saturation_rows

    models = [resolve(p, r) for p, r in pairs(paths, revisions)]  # every refusal before any work
    toks = [tokenizer_of(m) for m in models]
    check_together(models, toks, seeds=seeds)
    out = Path(out) if out else Path("claims-scratch") / "hf" / models[-1].slug
    corpus = corpus_for(ws, toks[-1])
    traces = [trace_of(ws, m, corpus, tokens=tokens) for m in models]
    command = command or f"python benchmarks/claims.py --hf {' '.join(paths)}"
    setup = describe(models, toks[-1], _tokens_in(traces[-1]), seq_len_for(ws, models[-1]), seeds)
    if seeds:
        each = [single_model(ws, m, traces[i:i + 1], corpus, tokens, setup, command) for i, m in enumerate(models)]
        results = over_seeds([r for r, _, _ in each], [m.label for m in models], setup, command)
        skipped = {k: v for _, s, _ in each for k, v in s.items()}
        skipped["olmoe-saturation"] = skipped["openmoe-early-routing"] = SEEDS_NOT_CHECKPOINTS
    else:
        results, skipped, m = single_model(ws, models[-1], traces, corpus, tokens, setup, command)
        if len(models) > 1:
            results += saturation_rows(traces, [mo.label for mo in models], m["early"]["result"], setup, command)
        else:
            skipped["olmoe-saturation"] = skipped["openmoe-early-routing"] = ONE_CHECKPOINT
    write(out, models, results, skipped, seeds)
    return out, results, skipped


def _tokens_in(trace: Path) -> int:
    from moelab.trace.io import open_trace

    t = open_trace(trace)
    return t.num_rows // (len(t.meta.num_experts) * t.meta.top_k)  # one row per (token, layer, rank)


def single_model(ws: Workspace, model: Brought, traces: Sequence[Path], corpus: Path, tokens: int, setup: str,
                 command: str) -> tuple[list[ClaimResult], dict[str, str], dict]:
    """The single-model rows on the last of `traces` (the earlier ones, its checkpoints, join its analysis
    as the early-routing series): (results, rows not measured and why, its metrics.json entry)."""
    from moelab.claims.byo_norms import norms_refusal
    from moelab.claims.byo_rows import norm_row, specialisation_rows, unmeasurable
    from moelab.claims.rows_closer import ALL_EXPERT_TOKENS
    from moelab.claims.routing import min_count
    from moelab.hf.families import read_hf_config

    key = hashlib.sha256("".join(str(t) for t in traces).encode()).hexdigest()[:12]
    metrics = ws.analyze(f"byo-{model.slug}-{key}", [traces[-1]], names=[model.slug],
                         early={model.slug: list(traces)} if len(traces) > 1 else None,
                         options={"min_count": min_count(ws)})
    m = metrics["models"][model.slug]
    skipped = unmeasurable(m, min_count(ws))
    results = specialisation_rows(m, setup, command, skip=list(skipped))
    why = norms_refusal(read_hf_config(model.folder).get("model_type") or "") if model.kind == "hf" else None
    if why:
        skipped["closer-norm-preference"] = f"the all-experts pass cannot run on this family: {why}"
    else:
        n = min(tokens or ws.scale.trace_tokens or ALL_EXPERT_TOKENS, ALL_EXPERT_TOKENS)
        results.append(norm_row(trace_of(ws, model, corpus, tokens=n, all_experts=True), setup, command))
    return results, skipped, m


def write(out: Path, models: Sequence[Brought], results: Sequence[ClaimResult], skipped: dict[str, str],
          seeds: bool = False) -> None:
    from moelab.claims.byo_table import render_byo

    res = out / "results"
    res.mkdir(parents=True, exist_ok=True)  # also when no row gave a number: the table says why
    for r in results:
        write_result(r, res)
    for row in skipped:  # an earlier run's result of a row this run did not measure is not this model's
        (res / f"{row}.json").unlink(missing_ok=True)
    write_text_atomic(out / "models.json", json.dumps(
        [{"label": m.label, "kind": m.kind, "folder": str(m.folder), "fingerprint": m.fingerprint,
          "experts": list(m.experts), "top_k": m.top_k} for m in models], indent=1) + "\n")
    write_text_atomic(out / "CLAIMS.md", render_byo(models, results, skipped, seeds))


def main_hf(args) -> int:
    """benchmarks/claims.py's --hf: the parsed arguments in, the results folder printed out."""
    import dataclasses
    import sys

    from moelab.claims.workspace import Scale
    from moelab.config import MoelabError

    if args.write_docs or args.table_only or args.only:
        raise MoelabError("--hf runs its own rows into a scratch folder: drop --write-docs, --table-only and --only")
    # the checkout's docs/ and the working folder's (an installed package's source may live elsewhere)
    for docs in dict.fromkeys([SRC.parents[1] / "docs", Path.cwd() / "docs"]):
        if args.results and Path(args.results).resolve().is_relative_to(docs.resolve()):
            raise MoelabError(f"--results {args.results}: --hf results go to a scratch folder, never under {docs}")
    if args.tokens < 0:
        raise MoelabError(f"--tokens {args.tokens} must be >= 0 (0: the whole held-out split)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    scale = dataclasses.replace(Scale.smoke() if args.smoke else Scale(), threads=args.threads)
    parts = ["python benchmarks/claims.py --hf", *args.hf]
    if args.revision:
        parts += ["--revision", *args.revision]
    if args.tokens:
        parts += ["--tokens", str(args.tokens)]
    if args.smoke:
        parts.append("--smoke")
    if args.seeds:
        parts.append("--seeds")
    out, results, skipped = run_byo(args.hf, Workspace(args.cache, scale), args.results or None,
                                    revisions=args.revision, tokens=args.tokens, command=" ".join(parts),
                                    seeds=args.seeds)
    for r in results:  # a smoke run is a pipeline check: it reads nothing into its numbers
        said = ("measured at smoke scale (no verdict)" if args.smoke else
                f"{'each model' if args.seeds else 'this model'}: {r.details['this_model']['reading']}; "
                f"verdict {r.verdict}")
        print(f"[claims] {r.row}: {r.measure.value:.4g} [{r.measure.ci_low:.4g}, {r.measure.ci_high:.4g}] vs null "
              f"{r.measure.null:.4g}; {said}", file=sys.stderr)
    for row, why in skipped.items():
        print(f"[claims] {row}: not measured ({why})", file=sys.stderr)
    print(f"[claims] wrote {out / 'CLAIMS.md'}", file=sys.stderr)
    return 0
