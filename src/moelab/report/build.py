"""`build_report`: traces (and checkpoints) -> analyses -> one HTML report and metrics.json.

Several traces are read one of two ways. Checkpoints of one model (the same model config, num_experts and
row count, distinct `checkpoint_step`s) get the early-routing analysis, every checkpoint against the last
by step, and the per-trace analyses of the final one. Anything else is a set of models compared side by
side: a table of headline numbers, then a part per model. `early={name: [traces]}` adds early routing
for a named model in either case (closed by the model's own trace when that is a later checkpoint of the
same model over the same tokens).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from moelab.analysis import analyze_all, early_routing, to_json_dict, weight_analysis
from moelab.analysis.weights import reorder_pairs_within
from moelab.analysis.common import plain
from moelab.analysis.resample import REPLICATES
from moelab.config import MoelabError
from moelab.report.headline import Headline, early_headlines, routing_headlines, weight_headlines
from moelab.report.html import Section, write_report
from moelab.report.sections import comparison_section, early_section, routing_sections, trace_table
from moelab.report.upcycle_section import checkpoint_expert_cosine, cosine_metrics, upcycle_section
from moelab.report.weights_section import weight_definition_headlines, weight_section
from moelab.trace.io import Trace, open_trace

OPTION_KEYS = ("min_count", "vocab_min_count", "pos_bucket", "n_permutations", "mi_ranks", "seed", "analyses",
               "n_bootstrap", "workers")
REORDER_MAX_HIDDEN = 2048  # neuron matching is a linear assignment on F x F: skip it for large experts


@dataclasses.dataclass
class ModelInput:
    name: str
    path: str
    trace: Trace
    checkpoints: list[tuple[str, Trace]] = dataclasses.field(default_factory=list)  # by step, final last
    weights: str | None = None


def traced_length(trace: Trace) -> int | None:
    """1 + the largest position in the trace, from the Parquet statistics (no rows are read)."""
    try:
        md = pq.ParquetFile(trace.path).metadata
        col = next(i for i in range(md.num_columns) if md.schema.column(i).path == "pos")
        stats = [md.row_group(g).column(col).statistics for g in range(md.num_row_groups)]
        return 1 + max(int(s.max) for s in stats) if all(s is not None and s.has_min_max for s in stats) else None
    except (StopIteration, OSError, ValueError, pa.ArrowException):
        return None


def analysis_options(options: Mapping[str, Any] | None, trace: Trace) -> dict[str, Any]:
    """analyze_all keywords; the position bucket defaults to 1/16 of the traced sequence length (else of
    the model's context, else 256) so that the drop-by-position curve has points to show."""
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTION_KEYS))
    if unknown:
        raise MoelabError(f"unknown analysis option {unknown[0]!r} (known: {', '.join(OPTION_KEYS)})")
    if "pos_bucket" not in opts:
        length = traced_length(trace) or (trace.meta.model_config or {}).get("max_seq_len")
        opts["pos_bucket"] = -(-length // 16) if isinstance(length, int) and length > 0 else 256
    return opts


def _unique_names(paths: Sequence[str], names: Sequence[str] | None, count: int) -> list[str]:
    if names is not None:
        if len(names) != count:
            raise MoelabError(f"--names: {len(names)} name(s) given for {count} model(s)")
        if len(set(names)) != len(names):
            raise MoelabError(f"--names must be distinct, got {list(names)}")
        return list(names)
    out: list[str] = []
    for p in paths[:count]:
        stem = Path(p).name.removesuffix(".parquet")
        out.append(stem if stem not in out else f"{stem}-{len(out) + 1}")
    return out


def is_checkpoint_series(traces: Sequence[Trace]) -> bool:
    """Same model (config, experts, top-k), same tokens (row count), distinct known steps."""
    if len(traces) < 2:
        return False
    metas = [t.meta for t in traces]
    steps = [m.checkpoint_step for m in metas]
    if any(s is None for s in steps) or len(set(steps)) != len(steps):
        return False
    m0 = metas[0]
    return (all(m.model_config == m0.model_config and m.num_experts == m0.num_experts and m.top_k == m0.top_k
                for m in metas) and len({t.num_rows for t in traces}) == 1)


def order_checkpoints(items: Sequence[tuple[str, Trace]]) -> list[tuple[str, Trace]]:
    """Checkpoint traces of one model, ordered by step (final last); a different model is an error."""
    if len(items) < 2:
        raise MoelabError("early routing needs at least two checkpoint traces of one model")
    ref_path, ref = items[-1]
    for path, t in items:
        if t.meta.model_config != ref.meta.model_config:
            from moelab.train.checkpoint import first_difference

            diff = first_difference(t.meta.model_config, ref.meta.model_config)
            raise MoelabError(f"early routing compares checkpoints of one model, but {path} and {ref_path} "
                              f"are different models ({diff})")
    steps = [t.meta.checkpoint_step for _, t in items]
    if all(s is None for s in steps):
        return list(items)  # no steps recorded: the order given is the training order
    if any(s is None for s in steps) or len(set(steps)) != len(steps):
        raise MoelabError(f"early routing needs a distinct checkpoint_step in every trace, got {steps}")
    return sorted(items, key=lambda item: item[1].meta.checkpoint_step)


def plan_models(paths: Sequence[str], names: Sequence[str] | None, weights: Sequence[str] | None,
                early: Any) -> tuple[str, list[ModelInput]]:
    """Open the traces and decide: one model, checkpoints of one model, or several models."""
    if not paths:
        raise MoelabError("give at least one trace to analyse")
    traces = [open_trace(p) for p in paths]
    pairs = [(str(p), t) for p, t in zip(paths, traces)]
    if is_checkpoint_series(traces):
        ordered = order_checkpoints(pairs)
        name = _unique_names([ordered[-1][0]], names, 1)[0]
        models, mode = [ModelInput(name, ordered[-1][0], ordered[-1][1], checkpoints=ordered)], "checkpoints"
    else:
        labels = _unique_names([str(p) for p in paths], names, len(paths))
        models = [ModelInput(n, p, t) for n, (p, t) in zip(labels, pairs)]
        mode = "single" if len(models) == 1 else "compare"
    if weights:
        if len(weights) != len(models):
            raise MoelabError(f"--weights: give one checkpoint per model ({len(models)} model(s), "
                              f"{len(weights)} checkpoint(s))")
        for m, w in zip(models, weights):
            m.weights = str(w)
            check_same_model_config(m.weights, m.trace.meta, m.path)
    for key, early_paths in _early_items(early, models):
        match = [m for m in models if m.name == key]
        if not match and len(models) == 1 and names is None:
            match, models[0].name = models, key  # one unnamed model takes the early series' name
        if not match:
            raise MoelabError(f"early routing for {key!r}: no model of that name (models: "
                              f"{', '.join(m.name for m in models)})")
        series = [(str(p), open_trace(p)) for p in early_paths]
        final = _final_if_later(match[0], series)
        if len(series) == 1 and not final:  # else "needs at least two" would hide why the final one is left out
            _refuse_unpaired(match[0], *series[0])
        match[0].checkpoints = order_checkpoints(series + final)
    return mode, models


def _final_if_later(m: ModelInput, series: Sequence[tuple[str, Trace]]) -> list[tuple[str, Trace]]:
    """The model's own trace closes its early series when it is a later checkpoint of the same model
    over the same tokens: "every checkpoint against the final one" then means the model analysed. Traces that
    record no step (a hub model's revisions, `trace --hf --revision`) are in the order given, the model's own
    trace last."""
    return [(m.path, m.trace)] if all(_unpaired(m, p, t) is None for p, t in series) else []


def _unpaired(m: ModelInput, path: str, t: Trace) -> str | None:
    """Why the early trace `t` cannot come before the model's own trace in one series (None: it can)."""
    final, fm = m.path, m.trace.meta
    if Path(path).resolve() == Path(final).resolve():
        return f"--early {path} is the final trace itself"
    if t.meta.model_config != fm.model_config or t.meta.num_experts != fm.num_experts or t.meta.top_k != fm.top_k:
        if t.meta.model_config is None or fm.model_config is None:
            none = path if t.meta.model_config is None else final
            return f"{none} records no model config, so {path} and {final} cannot be shown to be one model"
        from moelab.train.checkpoint import first_difference

        diff = first_difference(t.meta.model_config, fm.model_config) or (
            f"num_experts {t.meta.num_experts} vs {fm.num_experts}, top_k {t.meta.top_k} vs {fm.top_k}")
        return f"{path} and the final trace {final} are different models ({diff})"
    if t.num_rows != m.trace.num_rows:
        return (f"{path} holds {t.num_rows:,} rows and the final trace {final} {m.trace.num_rows:,}: checkpoint "
                f"traces must cover the same tokens (trace each with the same --data, --split and --tokens)")
    step, final_step = t.meta.checkpoint_step, fm.checkpoint_step
    if step is None and final_step is None:
        return None  # neither records a step (a hub model's revisions): the order given, the analysed trace last
    if step is None or final_step is None:
        return f"{path if step is None else final} records no checkpoint_step, so their order is unknown"
    if step >= final_step:
        return (f"{path} is from step {step}, {'the same as' if step == final_step else 'after'} the final "
                f"trace {final} (step {final_step}): give checkpoints from before it")
    return None


def _refuse_unpaired(m: ModelInput, path: str, t: Trace) -> None:
    """One early trace the model's own cannot follow: a corrupt file says so (its ids, read and checked here
    only on this failure path), else the first reason it cannot pair."""
    for _ in t.iter_batches(columns=["layer", "rank", "expert"]):
        pass
    raise MoelabError(f"early routing needs at least two checkpoint traces of one model: {_unpaired(m, path, t)}")


def _early_items(early: Any, models: Sequence[ModelInput]) -> list[tuple[str, list[str]]]:
    """`early` as {model name: traces} or as a list of trace lists, one per model in order."""
    if not early:
        return []
    if isinstance(early, Mapping):
        return [(str(k), [str(p) for p in v]) for k, v in early.items()]
    if len(early) > len(models):
        raise MoelabError(f"--early: {len(early)} checkpoint series given for {len(models)} model(s)")
    return [(m.name, [str(p) for p in v]) for m, v in zip(models, early)]


def token_decoder(meta: Any) -> Callable[[int], str] | None:
    """Token ID -> quoted text when the trace names a local tokenizer; None (IDs shown) otherwise."""
    path = meta.tokenizer
    if not path or not Path(path).exists():
        return None  # never a hub lookup: a report must build offline
    try:
        from moelab.data.tokenizer import load_tokenizer

        tok = load_tokenizer(path)
    except Exception:  # noqa: BLE001 - any unreadable tokenizer just means IDs instead of text
        return None
    return lambda t: repr(tok.decode([t]))[:24]


def step_label(trace: Trace, index: int) -> Any:
    """The checkpoint's step; else the hub revision it was traced at (`trace --hf --revision`); else its place
    in the given order."""
    step = trace.meta.checkpoint_step
    if step is not None:
        return step
    revision = (trace.meta.extra or {}).get("revision")
    return f"revision {revision}" if isinstance(revision, str) and revision else f"checkpoint {index + 1}"


def queue_setting(meta: Any, simulate: dict[str, Any] | None) -> dict[str, Any] | None:
    """The trained capacity setting of a trace, for its queue-only drop baseline; None when dropless.

    The sidecar does not record how many sequences shared a capacity batch: `batch_seqs` comes from the
    sidecar's extra keys when a writer put it there, else from the re-simulation flags, else 8 (`moelab
    trace`'s default batch)."""
    if meta.capacity_factor is None:
        return None
    extra = meta.extra or {}
    out = {"capacity_factor": meta.capacity_factor, "formula": meta.capacity_formula or "topk",
           "policy": meta.drop_policy or "openmoe",
           "batch_seqs": int(extra.get("batch_seqs") or (simulate or {}).get("batch_seqs") or 8)}
    if meta.group_size:
        out["group_size"] = meta.group_size
    if extra.get("min_capacity") is not None:
        out["min_capacity"] = int(extra["min_capacity"])
    return out


def analyse_model(m: ModelInput, labels: Sequence[str], simulate: dict[str, Any] | None,
                  options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every analysis of one model: routing of its trace, early routing, weights."""
    opts = analysis_options(options, m.trace)
    cosine = checkpoint_expert_cosine(m.weights) if m.weights else None  # first: a corrupt file fails fast
    # Before the routing passes: a checkpoint of another model fails in seconds, not after them.
    weights = _weights(m.weights, m.trace.meta, m.path) if m.weights else None
    queue = queue_setting(m.trace.meta, simulate)
    if simulate is not None and queue is not None and queue["batch_seqs"] != simulate.get("batch_seqs", 8):
        queue["batch_seqs"] = simulate.get("batch_seqs", 8)  # one pass regroups rows by one batch size
    with _unreadable_as_error(m.path):
        results = analyze_all(m.trace, labels=labels, simulate=simulate, queue=queue, **opts)
    shown = {k: v for k, v in opts.items() if k != "workers"}  # how many processes never changes a result
    out: dict[str, Any] = {"results": results, "options": shown, "early": None, "weights": None, "note": "",
                           "cosine": cosine}
    out["headlines"] = routing_headlines(results, labels)
    if m.checkpoints:
        steps = [step_label(t, i) for i, (_, t) in enumerate(m.checkpoints)]
        with _unreadable_as_error(", ".join(p for p, _ in m.checkpoints)):
            out["early"] = early_routing([t for _, t in m.checkpoints], steps=steps[:-1],
                                         n_permutations=opts.get("n_permutations", 16),
                                         n_bootstrap=opts.get("n_bootstrap", REPLICATES))
        out["headlines"] += early_headlines(out["early"], m.trace.meta.top_k)
    if weights is not None:
        out["weights"], out["note"] = weights
        out["headlines"] += weight_headlines(out["weights"], out["note"]) + weight_definition_headlines(out["weights"])
    return out


@contextlib.contextmanager
def _unreadable_as_error(what: str) -> Iterator[None]:
    """open_trace checks a file's footer and schema; a damaged body only fails while rows are read, as
    pyarrow's OSError / ArrowException: that is bad input too, named by its file."""
    try:
        yield
    except (OSError, pa.ArrowException) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoelabError(f"trace {what} is unreadable (corrupt file?): {text}") from None


def check_same_model_config(weights: str, meta: Any, trace_path: str) -> None:
    """--weights of a moelab checkpoint beside a moelab trace: the trace's recorded model must be the
    checkpoint's (a checkpoint of another step of the same model is fine). Read from config.json only."""
    from moelab.model.config import ModelConfig
    from moelab.train.checkpoint import first_difference, read_checkpoint_config
    from moelab.trace.weights import is_transformers_folder

    if not meta.model_config or meta.source != "moelab" or is_transformers_folder(Path(weights)):
        return
    from moelab.train.commands import resolve_checkpoint

    ckpt = resolve_checkpoint(weights)
    mine = ModelConfig.from_dict(read_checkpoint_config(ckpt)["model"], path="model").to_dict()
    try:
        theirs = ModelConfig.from_dict(meta.model_config, path="model").to_dict()
    except MoelabError:  # a record this moelab cannot read as a config: the layers' own check still runs
        return
    diff = first_difference(mine, theirs)
    if diff:
        raise MoelabError(f"--weights {weights} is a checkpoint of another model than the one trace {trace_path} "
                          f"was written by: {diff} (checkpoint vs trace)")


def check_weights_fit(layers: Sequence[dict[str, Any]], meta: Any, weights: str, trace_path: str) -> None:
    """The checkpoint's MoE layers must be the trace's: the same blocks with the same expert counts (a
    transformers family's router may score more classes than it has FFN experts, zero-computation ones, so
    there the trace's count is an upper bound)."""
    from moelab.trace.weights import layer_shapes

    blocks = meta.extra.get("moe_blocks")
    shapes = layer_shapes(layers)  # no weight read: a 7B checkpoint's are read one layer at a time later
    got_E = [sh["experts"] for sh in shapes]
    got_blocks = [int(sh["block"]) for sh in shapes if sh.get("block") is not None]
    want_E = list(meta.num_experts)
    exact = meta.source == "moelab"
    fits_E = len(got_E) == len(want_E) and all(g == w if exact else g <= w for g, w in zip(got_E, want_E))
    if not fits_E or (blocks and len(got_blocks) == len(layers) and got_blocks != list(blocks)):
        where = f"blocks {got_blocks}" if got_blocks else f"{len(layers)} MoE layers"
        raise MoelabError(f"--weights {weights} does not fit trace {trace_path}: its MoE layers ({where}) have "
                          f"{got_E} experts, the trace's ({'blocks ' + str(list(blocks)) if blocks else 'layers'}) "
                          f"{list(meta.num_experts)}: give the checkpoint of the model that wrote the trace")


def _weights(path: str, meta: Any, trace_path: str) -> tuple[Any, str]:
    from moelab.trace.weights import checkpoint_weight_layers, layer_shapes

    layers = checkpoint_weight_layers(path)
    check_weights_fit(layers, meta, path, trace_path)
    first = layer_shapes(layers)[0]
    E, F = first["experts"], first["hidden"]
    pairs = reorder_pairs_within(E, F) if F <= REORDER_MAX_HIDDEN else []
    return weight_analysis(layers, reorder_pairs=pairs), first.get("router_note", "")


def model_sections(m: ModelInput, a: dict[str, Any], labels: Sequence[str], level: int) -> list[Section]:
    meta = m.trace.meta
    intro = Section("Trace", blocks=[trace_table(meta, m.path, a["results"])])
    scoring = str(meta.extra.get("scoring_function") or "softmax")  # written by `trace --hf`
    out = [intro] + routing_sections(a["results"], labels, a["options"]["pos_bucket"], token_decoder(meta), scoring)
    if a["early"] is not None:
        paths = [p for p, _ in m.checkpoints]
        out.append(early_section(a["early"], step_label(m.checkpoints[-1][1], len(paths) - 1), paths))
    if a["weights"] is not None:
        out.append(weight_section(a["weights"], m.weights, a["note"]))
    if a["cosine"] is not None:
        out.append(upcycle_section(a["cosine"]))
    for s in out:
        s.level = level
    return out


def model_metrics(m: ModelInput, a: dict[str, Any]) -> dict[str, Any]:
    early = None
    if a["early"] is not None:
        early = {"traces": [p for p, _ in m.checkpoints], "result": a["early"]}
    weights = None
    if a["weights"] is not None:
        weights = {"checkpoint": m.weights, "note": a["note"], "result": a["weights"]}
    return {"trace": m.path, "meta": m.trace.meta, "options": a["options"],
            "headline": {h.key: h for h in a["headlines"]}, "analyses": to_json_dict(a["results"]),
            "early": early, "weights": weights, "expert_cosine": cosine_metrics(a["cosine"])}


def _subtitle(mode: str, models: Sequence[ModelInput]) -> str:
    if mode == "checkpoints":
        steps = ", ".join(str(t.meta.checkpoint_step) for _, t in models[0].checkpoints)
        return f"Checkpoints at steps {steps} of one model; routing analyses of the final one."
    if mode == "compare":
        return f"{len(models)} models side by side: {', '.join(m.name for m in models)}."
    return f"Routing analyses of {models[0].path}."


def build_report(trace_paths: Sequence[str | Path], out_dir: str | Path, *,
                 weights: Sequence[str | Path] | None = None, labels: Sequence[str] | None = None,
                 simulate: dict[str, Any] | None = None, title: str | None = None,
                 names: Sequence[str] | None = None,
                 early: Mapping[str, Sequence[str | Path]] | Sequence[Sequence[str | Path]] | None = None,
                 options: Mapping[str, Any] | None = None, dpi: int = 100,
                 interventions: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Analyse, then write `report.html` and `metrics.json` into out_dir; returns the metrics dict.

    `interventions`: `moelab intervene` / `moelab diff` result files, one section each (read before any
    analysis, so a bad file fails fast).
    `early` is {model name: checkpoint traces} or one list of traces per model, in order. Nothing is
    written unless every analysis succeeded. `options` go to `analyze_all` (min_count,
    vocab_min_count, pos_bucket, n_permutations, mi_ranks, seed, analyses).
    """
    from moelab.report.intervene_section import intervention_sections

    labels = tuple(labels) if labels is not None else ("domain", "lang")
    extra_sections, intervention_metrics = intervention_sections([str(p) for p in interventions])
    mode, models = plan_models([str(p) for p in trace_paths], names, [str(w) for w in weights or []], early)
    analysed = [analyse_model(m, labels, simulate, options) for m in models]
    headlines: dict[str, list[Headline]] = {m.name: a["headlines"] for m, a in zip(models, analysed)}
    several = len(models) > 1
    summary = [f"{name}: {h.text}" if several else h.text for name, hs in headlines.items() for h in hs if h.text]
    sections: list[Section] = [comparison_section(headlines)] if several else []
    for m, a in zip(models, analysed):
        if several:
            sections.append(Section(m.name, level=2))
        sections += model_sections(m, a, labels, level=3 if several else 2)
    sections += extra_sections
    title = title or ("Routing report: " + " vs ".join(m.name for m in models))
    metrics = plain({"title": title, "mode": mode, "labels": list(labels), "simulate": simulate,
                     "summary": summary, "models": {m.name: model_metrics(m, a) for m, a in zip(models, analysed)},
                     **({"interventions": intervention_metrics} if intervention_metrics else {})})
    grouped = {name: [h.text for h in hs if h.text] for name, hs in headlines.items()}
    files = write_report(out_dir, sections, title=title, summary=grouped if several else summary,
                         subtitle=_subtitle(mode, models), metrics=metrics, dpi=dpi)
    metrics["files"] = {k: str(v) for k, v in files.items()}
    return metrics
