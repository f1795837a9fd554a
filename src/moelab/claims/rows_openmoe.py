"""OpenMoE's claims: MoE beats dense at equal active compute (more rows are added beside it)."""

from __future__ import annotations

import dataclasses

import numpy as np

from moelab.claims.heldout import seq_losses, two_level_bootstrap
from moelab.claims.models import base_run, final, millions, param_counts, train_curve
from moelab.claims.record import ClaimResult
from moelab.claims.registry import row
from moelab.claims.seeds import PAIRED_T
from moelab.claims.verdict import Claim, Measure
from moelab.claims.workspace import Workspace


MOE_MARGIN = 0.01  # nats


@row("openmoe-moe-beats-dense", "OpenMoE")
def moe_beats_dense(ws: Workspace) -> ClaimResult:
    s, corpus = ws.scale, ws.corpus()
    sums = {"tiny-dense": [], "tiny-moe": []}
    for seed in range(s.seeds):
        for preset in sums:
            total_S, counts_S = seq_losses(final(base_run(ws, preset, seed)), corpus, s.seq_len, s.batch_size,
                                  device=ws.eval_device)
            sums[preset].append(total_S)
    dense_NS, moe_NS = np.array(sums["tiny-dense"]), np.array(sums["tiny-moe"])
    value, lo, hi = two_level_bootstrap(dense_NS - moe_NS, counts_S)
    dense_p, moe_p = param_counts(base_run(ws, "tiny-dense")), param_counts(base_run(ws, "tiny-moe"))
    per_seed = [{"seed": i, "dense": float(d.sum() / counts_S.sum()), "moe": float(m.sum() / counts_S.sum())}
                for i, (d, m) in enumerate(zip(dense_NS, moe_NS))]
    return ClaimResult(
        row="openmoe-moe-beats-dense", paper="OpenMoE",
        claim="An MoE LM beats a dense LM of equal active parameters trained on the same tokens.",
        paper_number="OpenMoE-8B/32E (2B active) is compared with dense models of similar cost and leads on "
                     "most benchmarks; the paper reports no matched-loss number.",
        measured="Held-out loss of tiny-dense minus tiny-moe (nats per token, positive: MoE better), paired by "
                 "held-out sequence and seed; null 0 (no difference). 95% interval: t over seeds (the two-level "
                 "bootstrap over seeds and sequences in details).",
        measure=Measure(value, lo, hi, 0.0), test=Claim("greater", margin=MOE_MARGIN), unit=" nats",
        setup=f"tiny-dense ({millions(dense_p[0])}) vs tiny-moe ({millions(moe_p[0])} active of {millions(moe_p[1])}; "
              f"top-2 of 8, shared expert, capacity 1.25), "
              f"{s.describe()}, main corpus (code, English prose, math, de/fr/ja UI strings), all "
              f"{int(counts_S.sum()):,} held-out tokens.",
        seeds=s.seeds, details={"per_seed": per_seed}, precondition=loss_gap_settled(ws, MOE_MARGIN),
        note=f"Margin {MOE_MARGIN} nats: a gain below 1% perplexity is not what the paper's comparison is about. "
             "The precondition is the RMoE loss rows': the training-loss gap (dense minus MoE, the same batches "
             "per seed) moved less than the margin over the last 20% of training.")


def loss_gap_settled(ws: Workspace, margin: float):
    """The base runs' training-loss gap, dense minus MoE, settled to within the margin (`gap_settled`)."""
    from moelab.claims.preconditions import gap_settled

    n = ws.scale.seeds
    return gap_settled([train_curve(base_run(ws, "tiny-dense", i)) for i in range(n)],
                       [train_curve(base_run(ws, "tiny-moe", i)) for i in range(n)], margin)


# ---- routing of the trained tiny-moe: context-independent specialisation, early routing ------------------
CONTEXT_MARGIN = 0.25  # of the ceiling (always the same k experts): a quarter of the way from chance


@row("openmoe-context-independent", "OpenMoE")
def context_independent(ws: Workspace) -> ClaimResult:
    from moelab.claims.routing import describe_run, final_models, measure_of, min_count
    from moelab.claims.stats import excess_gap

    def gap_of(model: dict) -> tuple[Measure, Measure, Measure, float]:
        heads = model["headline"]
        tok, pos = measure_of(heads["std_token"]["estimate"]), measure_of(heads["std_position"]["estimate"])
        ceiling = float(np.mean(model["analyses"]["std_token"]["deterministic"]))
        return excess_gap(tok, pos, scale=ceiling), tok, pos, ceiling

    models = final_models(ws)
    each = [gap_of(model) for model in models]
    gap, tok, pos, ceiling = each[0]
    analyses = models[0]["analyses"]
    ceilings = analyses["std_token"]["deterministic"]
    per_layer = [{"layer": i, "token_std": t["value"], "token_null": t["null_mean"], "position_std": p["value"],
                  "position_null": p["null_mean"], "ceiling": c}
                 for i, (t, p, c) in enumerate(zip(analyses["std_token"]["estimates"],
                                                   analyses["std_position"]["estimates"], ceilings))]
    return ClaimResult(
        row="openmoe-context-independent", paper="OpenMoE",
        claim="Routing is context-independent: experts specialise on token IDs, well above any specialisation "
              "on positions.",
        paper_number="OpenMoE-8B: std score about 0.085 for token IDs vs about 0.01 for position IDs "
                     "(deterministic top-2 of 32 would give about 0.12).",
        measured="OpenMoE's std score (std over experts of a group's routing shares; token IDs seen >= "
                 f"{min_count(ws)} times, all positions), mean over MoE layers. Value: the token-ID score's "
                 "excess over its load-keeping null minus the position score's excess over its own null (the "
                 "label shuffled among the tokens of each sequence), divided by the ceiling of a router that always picks "
                 "the same k experts, so 1 is the whole way from chance to deterministic. Null 0: token IDs no "
                 "more specialised than positions. Per seed (each final checkpoint); 95% interval: t over seeds "
                 "(each seed's sequence-bootstrap interval, combined in quadrature with the nulls' spread, in details).",
        measure=gap, test=Claim("greater", margin=CONTEXT_MARGIN), unit="", seed_values=[g.value for g, *_ in each],
        setup=f"{describe_run(ws, seeds=ws.scale.seeds)}; every held-out token of each final checkpoint traced at "
              "the trained capacity.",
        seeds=ws.scale.seeds,
        details={"token_std": dataclasses.asdict(tok), "position_std": dataclasses.asdict(pos), "ceiling": ceiling,
                 "per_layer": per_layer, "per_seed": [dataclasses.asdict(g) for g, *_ in each]},
        note=f"Margin {CONTEXT_MARGIN} of the ceiling: the paper's gap (0.085 - 0.01) is about 0.6 of its ceiling "
             "0.12; 'well above' is read as at least a quarter of the way. Details other than per_seed are seed 0's.")


EARLY_FRACTIONS = (0.1, 0.2)


def agreement_at(traces: list, snapshot) -> dict[str, Measure]:
    """Top-1 agreement and top-k overlap of one snapshot with the final checkpoint (interval and null)."""
    from moelab.analysis import early_routing
    from moelab.trace.io import open_trace

    first = early_routing([open_trace(snapshot), open_trace(traces[-1])]).first
    return {k: Measure(float(e.value), float(e.ci_low), float(e.ci_high), float(e.null_mean), float(e.null_sd))
            for k, e in first.items() if k in ("top1", "overlap")}


def seed_agreement(ws: Workspace, seed: int, fraction: float) -> tuple[int, dict[str, Measure]]:
    """(step, agreement_at) of base run `seed`'s snapshot nearest `fraction` of training against its final
    checkpoint; the traces share the cache names of `routing.checkpoint_traces`."""
    from moelab.claims.models import checkpoints
    from moelab.claims.routing import step_of

    cks = checkpoints(base_run(ws, "tiny-moe", seed))
    snaps = cks[:-1]
    i = int(np.argmin([abs(step_of(c) / ws.scale.steps - fraction) for c in snaps]))
    step = step_of(snaps[i])
    snap = ws.trace(snaps[i], f"ckpt-tiny-moe-s{seed}-{step}")
    last = ws.trace(cks[-1], f"ckpt-tiny-moe-s{seed}-{step_of(cks[-1])}")
    return step, agreement_at([snap, last], snap)


def agreement_over_seeds(ws: Workspace, fraction: float, key: str) -> tuple[Measure, list[float], list[dict]]:
    """`key` ("top1" or "overlap") of every seed's snapshot at `fraction` against its final checkpoint: (seed
    0's measure with the mean null, the per-seed values each paired with its own null, per-seed details)."""
    from moelab.claims.seeds import null_paired

    each = [(seed, *seed_agreement(ws, seed, fraction)) for seed in range(ws.scale.seeds)]
    paired, null = null_paired([a[key].value for _, _, a in each], [a[key].null for _, _, a in each])
    per_seed = [{"seed": seed, "step": step, **{k: dataclasses.asdict(v) for k, v in a.items()}}
                for seed, step, a in each]
    return dataclasses.replace(each[0][2][key], null=null), paired, per_seed


def regime_over_seeds(ws: Workspace, step: int):
    """`snapshot_regime` on the base runs' mean training-loss curve over the seeds."""
    from moelab.claims.preconditions import mean_curve, snapshot_regime

    curves = [train_curve(base_run(ws, "tiny-moe", seed)) for seed in range(ws.scale.seeds)]
    return snapshot_regime(mean_curve(curves), step, ws.scale.steps)


def early_curve(early: dict) -> list[dict]:
    """Per snapshot: step, top-1 agreement / top-k overlap per layer and their nulls (means over layers too)."""
    out = []
    for c, step in enumerate(early["steps"]):
        row_ = {"step": step}
        for key in ("top1_agreement", "null_top1", "topk_overlap", "null_overlap"):
            per_layer = early[key][c]
            row_[key] = per_layer
            row_[f"{key}_mean"] = float(np.nanmean(np.asarray(per_layer, float)))
        out.append(row_)
    return out


def halfway_step(curve: list[dict], key: str) -> int | None:
    """The first snapshot whose mean `key` is at least half of the way from its null to 1 (None: none is)."""
    null = {"top1_agreement": "null_top1", "topk_overlap": "null_overlap"}[key]
    for c in curve:
        if c[f"{key}_mean"] >= c[f"{null}_mean"] + (1 - c[f"{null}_mean"]) / 2:
            return c["step"]
    return None


def halfway_text(step: int | None, total: int) -> str:
    if step is None:
        return "no snapshot before the final one gets half of the way"
    return f"the first snapshot half of the way there is step {step} ({step / total:.0%} of training)"


@row("openmoe-early-routing", "OpenMoE")
def early_routing_row(ws: Workspace) -> ClaimResult:
    from moelab.claims.routing import checkpoint_traces, describe_run, routing_metrics

    m = routing_metrics(ws)
    traces = checkpoint_traces(ws)
    at = {f: agreement_over_seeds(ws, f, "top1") for f in EARLY_FRACTIONS}
    top1, values, per_seed = at[EARLY_FRACTIONS[-1]]
    step = per_seed[0]["step"]
    margin = (1 - top1.null) / 2
    curve = early_curve(m["early"]["result"])
    half = halfway_step(curve, "top1_agreement")
    n = ws.scale.seeds
    return ClaimResult(
        row="openmoe-early-routing", paper="OpenMoE", precondition=regime_over_seeds(ws, step),
        claim="Routing is learned early: at 10-20% of training the token-to-expert assignment already "
              "(almost) coincides with the final one.",
        paper_number="OpenMoE-8B: E_i(token) at 200B tokens almost coincides with 1T tokens (a figure; no scalar).",
        measured=f"Top-1 agreement (share of held-out tokens whose first expert is the same) between the "
                 f"checkpoint at step {step} ({EARLY_FRACTIONS[-1]:.0%} of training) and the final one, mean over "
                 "MoE layers, per seed. Null: unrelated checkpoints with their own loads (token identity shuffled "
                 f"between the two: sum_e a_e b_e), {PAIRED_T} Details: the same at 10%, top-k overlap, and seed 0's "
                 "curve over the snapshots.",
        measure=top1, test=Claim("greater", margin=margin), seed_values=values,
        setup=f"{describe_run(ws, seeds=n)}; {len(traces) - 1} snapshots every {ws.scale.steps // (len(traces))} "
              "steps and the final checkpoint, each traced over the same held-out tokens.",
        seeds=n,
        details={"per_seed": {f"{f:.0%}": v[2] for f, v in at.items()}, "curve_seed0": curve,
                 "halfway_step_seed0": half},
        note=f"Margin (1 - null) / 2 = {margin:.3f}: 'already high' is read as at least half of the way from an "
             f"unrelated router to the final one; for seed 0, {halfway_text(half, ws.scale.steps)}. OpenMoE's "
             "checkpoints are hundreds of billions of tokens apart, ours a few hundred steps of a run whose "
             "learning rate is still high: routing here keeps moving through most of training, which the "
             "precondition (the snapshot's loss near the final one) measures.")
