"""Rows the interventions answer, on the trained tiny-moe of every seed: does one expert suffice (k=1 vs
the model's own k), and does any observational score rank experts the way ablating them does?

Both claims say an effect is small, so each is decided against a bound: the measure's `null` is the
largest value that still counts as "small" (a non-inferiority bound), and the claim is "less" than it:
reproduced when the whole 95% interval lies below the bound, not reproduced when it lies above.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from moelab.claims.heldout import two_level_bootstrap
from moelab.claims.models import base_run, final
from moelab.claims.record import ClaimResult
from moelab.claims.registry import row
from moelab.claims.routing import describe_run
from moelab.claims.stats import pooled_rho
from moelab.claims.verdict import Claim, Measure, Precondition
from moelab.claims.workspace import Workspace

LOSS_BOUND = 0.05  # nats per token: k=1 "suffices" when it costs under ~5% perplexity
RHO_BOUND = 0.5  # a score ranking experts with rho below this is no use for choosing what to prune


def _held_out(ws: Workspace, seed: int):
    """(model, batches, capacity factor) of a base run's final checkpoint on the first held-out tokens."""
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.intervene.study import take_batches
    from moelab.train.checkpoint import load_model

    model = load_model(final(base_run(ws, "tiny-moe", seed))).eval()
    batches = iter_sequential(load_corpus(ws.corpus()), seq_len=ws.scale.seq_len, batch_size=ws.scale.batch_size,
                              split="heldout")
    return model, take_batches(batches, intervention_tokens(ws)), model.config.moe.capacity_factor_eval


def intervention_tokens(ws: Workspace) -> int:
    return ws.scale.eval_tokens


@contextlib.contextmanager
def no_routed_experts(model):
    """Within the block, every MoE layer's routed output is zero; shared experts and attention stay: the
    all-routed-experts-removed control that one-expert-suffices is measured against."""
    from moelab.intervene.edit import moe_blocks

    def hook(layer, args, out):
        return out._replace(y_TD=torch.zeros_like(out.y_TD))

    handles = [layer.register_forward_hook(hook) for layer in moe_blocks(model).values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def control_losses(model, batches, cf) -> dict[str, np.ndarray]:
    """Per held-out sequence: summed loss at the model's own k, at k=1, with no routed expert; tokens."""
    from moelab.intervene.edit import RoutingEdit
    from moelab.intervene.runner import sweep_loss

    out: dict[str, list] = {"own": [], "k1": [], "none": [], "count": []}
    for batch in batches:
        valid_BS = batch["labels"][:, 1:] != -100
        for key, edit in (("own", RoutingEdit()), ("k1", RoutingEdit(top_k=1))):
            loss_BS, _ = sweep_loss(model, batch["input_ids"], batch["labels"], edit, cf)
            out[key].append(loss_BS.nan_to_num(0.0).double().sum(1).numpy())
        with no_routed_experts(model):
            loss_BS, _ = sweep_loss(model, batch["input_ids"], batch["labels"], RoutingEdit(), cf)
        out["none"].append(loss_BS.nan_to_num(0.0).double().sum(1).numpy())
        out["count"].append(valid_BS.sum(1).double().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def one_expert_decision(per_seed: list[dict[str, np.ndarray]]) -> tuple[list[float], Precondition, Measure]:
    """Per seed, k=1's loss cost as a share of the cost of removing every routed expert (0: k=1 loses
    nothing; 1: as bad as no routed expert); the precondition that the control costs anything (its
    interval over seeds and sequences above 0); and that control's cost."""
    from moelab.claims.preconditions import beyond_null

    shares = []
    for d in per_seed:
        cost_k1, cost_none = (d["k1"] - d["own"]).sum(), (d["none"] - d["own"]).sum()
        shares.append(float(cost_k1 / cost_none) if cost_none > 0 else float("nan"))
    counts_S = per_seed[0]["count"]
    v, lo, hi = two_level_bootstrap(np.array([d["none"] - d["own"] for d in per_seed]), counts_S)
    control = Measure(v, lo, hi, 0.0)
    return shares, beyond_null(control, "the loss cost of removing every routed expert (shared kept)"), control


@row("intervene-one-expert-suffices", "Interventions")
def one_expert_suffices(ws: Workspace) -> ClaimResult:
    from moelab.intervene.study import cosine_study

    losses, per_seed = [], []
    for seed in range(ws.scale.seeds):
        model, batches, cf = _held_out(ws, seed)
        d = control_losses(model, batches, cf)
        losses.append(d)
        n = d["count"].sum()
        cos = cosine_study(model, batches, cf)
        per_seed.append({"seed": seed, "loss_own_k": float(d["own"].sum() / n), "loss_k1": float(d["k1"].sum() / n),
                         "loss_no_routed": float(d["none"].sum() / n),
                         "cosine_k1_vs_own_by_block": {str(b): v["k1_vs_own"] for b, v in cos.items()},
                         "cosine_k1_vs_all_by_block": {str(b): v["k1_vs_all"] for b, v in cos.items()}})
    shares, regime, control = one_expert_decision(losses)
    for p, share in zip(per_seed, shares):
        p["k1_share_of_control"] = share
    k1_cost = two_level_bootstrap(np.array([d["k1"] - d["own"] for d in losses]), losses[0]["count"])
    k = model.config.moe.top_k
    return ClaimResult(
        row="intervene-one-expert-suffices", paper="Interventions",
        claim=f"One expert suffices: routing each token to its top-1 expert instead of the model's own top-{k} "
              "keeps the layer's output direction and the model's loss.",
        paper_number="The interventions issue names the check (per-layer cosine of the k=1 and the full-k output, "
                     "and the loss for k = 1..E); it quotes no number.",
        measured=f"Per seed, the held-out loss cost of k=1 on every MoE block (against the model's own k={k}) as "
                 "a share of the cost of removing every routed expert (shared expert kept): the negative control "
                 "is the null (share 1: k=1 is as bad as no routed expert). 95% interval: t over seeds. "
                 f"Details: the k=1 cost in nats (against the former bound {LOSS_BOUND}), the control's cost, "
                 "per seed and MoE block the cosine between the block's k=1 output and its own-k output.",
        measure=Measure(float(np.nanmean(shares)), float("nan"), float("nan"), 1.0),
        test=Claim("less", margin=0.5), seed_values=shares, precondition=regime,
        setup=f"{describe_run(ws, seeds=ws.scale.seeds)}; the first {int(losses[0]['count'].sum()):,} held-out "
              "tokens per seed.",
        seeds=ws.scale.seeds,
        details={"per_seed": per_seed, "k1_cost_nats": dict(zip(("value", "ci_low", "ci_high"), k1_cost)),
                 "control_cost_nats": {"value": control.value, "ci_low": control.ci_low, "ci_high": control.ci_high}},
        note="Margin 0.5: k=1 'suffices' when it costs at most half of what removing all routed experts "
             "costs. A fixed loss bound was passed by that control itself (+0.016 to +0.026 nats under the "
             f"bound {LOSS_BOUND} with a near-uniform router), so it could not tell 'one expert suffices' from "
             "'the routed experts do little'; the precondition asks that the control cost something at all.")


def _ablate_and_observe(model, batches, cf) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """[S, L, E] per-sequence sums of one seed: the four observational sums and each expert's ablation
    loss change (sum and token count); beside them `moelab intervene`'s own per-block rho with its interval
    (over sequences, this seed alone)."""
    from moelab.intervene.edit import moe_blocks
    from moelab.intervene.observe import SCORES as NAMES, obs_vs_causal, observe
    from moelab.intervene.stats import seq_totals
    from moelab.intervene.study import run_ablation

    blocks = moe_blocks(model)
    targets = [(b, (e,)) for b, layer in blocks.items() for e in range(layer.num_experts)]
    tokens, _, deltas_MN = run_ablation(model, batches, targets, cf)
    sums = observe(model, batches, cf)
    S = next(iter(sums.values())).shape[1]
    tot = [seq_totals(tokens.seq, d_N, S) for d_N in deltas_MN]
    out = {name: np.stack([sums[b][i] for b in blocks], axis=1)
           for i, name in enumerate(("count", "weight", "norm", "saliency"))}
    E = blocks[next(iter(blocks))].num_experts
    out["effect_sum"] = np.stack([t[0] for t in tot], axis=1).reshape(S, len(blocks), E)
    out["effect_cnt"] = np.stack([t[1] for t in tot], axis=1).reshape(S, len(blocks), E)
    per_block = {}
    for i, b in enumerate(blocks):
        r = obs_vs_causal(sums[b], tokens.seq, deltas_MN[i * E:(i + 1) * E])
        per_block[str(b)] = {name: r[name] for name in NAMES}
    return out, per_block


# score name -> (numerator, denominator) of its per-sequence sums (None: a plain sum)
SCORES = {"frequency": ("count", None), "gate_weighted": ("weight", None),
          "activation_norm": ("norm", "count"), "reap": ("saliency", "count")}


@row("intervene-observational-vs-causal", "Interventions")
def observational_vs_causal(ws: Workspace) -> ClaimResult:
    from moelab.model.config import ModelConfig
    from moelab.train.checkpoint import read_checkpoint_config

    results = [_ablate_and_observe(*_held_out(ws, seed)) for seed in range(ws.scale.seeds)]
    seeds, per_block = [r[0] for r in results], [r[1] for r in results]
    stack = {k: np.stack([s[k] for s in seeds]) for k in seeds[0]}  # [N, S, L, E]
    scores = {}
    for name, (num, den) in SCORES.items():
        value, lo, hi, rho_NL = pooled_rho(stack[num], None if den is None else stack[den],
                                           stack["effect_sum"], stack["effect_cnt"])
        scores[name] = {"rho": value, "ci_low": lo, "ci_high": hi, "per_seed_layer": rho_NL.tolist()}
    best = max(scores, key=lambda n: scores[n]["rho"] if np.isfinite(scores[n]["rho"]) else -np.inf)
    b = scores[best]
    effect_NLE = stack["effect_sum"].sum(1) / np.maximum(stack["effect_cnt"].sum(1), 1)
    blocks = ModelConfig.from_dict(read_checkpoint_config(final(base_run(ws, "tiny-moe")))["model"]).moe_layer_ids()
    N, S, L, E = stack["count"].shape
    return ClaimResult(
        row="intervene-observational-vs-causal", paper="Interventions",
        claim="No observational importance score (selection frequency, gate-weighted frequency, activation norm, "
              "REAP saliency) predicts an expert's causal effect: their rank correlation with it is near 0.",
        paper_number="arXiv 2606.10703 (2026): on OLMoE, Qwen1.5-MoE and DeepSeek-V2-Lite no observational score "
                     "predicts the loss change from removing an expert (the issue quotes no correlation value).",
        measured="Per MoE block, Spearman's rho over its experts between the held-out loss change from removing "
                 "each expert alone (causal) and each observational score over the same tokens; mean over blocks "
                 "and seeds. Value: the best of the four scores (its selection favours finding a predictor, "
                 "against the claim). 95% interval: t over seeds (the two-level bootstrap over seeds and sequences, "
                 f"both sides recomputed per draw, in details). Null column: the bound {RHO_BOUND} that a usable predictor would exceed "
                 "(chance is 0).",
        measure=Measure(b["rho"], b["ci_low"], b["ci_high"], RHO_BOUND), test=Claim("less", margin=0.0),
        setup=f"{describe_run(ws, seeds=ws.scale.seeds)}; every expert of the {L} MoE blocks {blocks} removed alone "
              f"({L * E} ablations per seed) over the first {int(stack['effect_cnt'][0, :, 0, 0].sum()):,} "
              f"held-out tokens ({S} sequences) at the eval capacity.",
        seeds=N,
        details={"best_score": best, "scores": scores, "causal_effect_by_seed_layer": effect_NLE.tolist(),
                 "per_seed_block": per_block},
        note=f"A 'less' claim against the bound {RHO_BOUND}: reproduced when the whole interval of the best "
             f"score's mean rho lies below it, not reproduced when above. With {E} experts per block one rho is "
             "coarse, hence the mean over blocks and seeds; the interval redraws text and seeds, not experts. "
             f"Removing one expert changes the loss by {float(np.mean(effect_NLE)):+.4f} nats on average (largest "
             f"{float(np.max(effect_NLE)):+.4f}): at this size the effects being ranked are small.")
