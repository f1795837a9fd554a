"""A Closer Look's claims on the 8-layer linear-router models (rmoe8.py): the router prefers experts with
large output norms, the router's rows resemble the experts' gate projections (neurons as fine-grained
experts), and expert outputs grow more diverse with depth except at the last layer.

The dynamic rows read all-experts traces (every expert run on every token); those are wide (E(E-1)/2
cosines per token and layer), so they cover at most ALL_EXPERT_TOKENS held-out tokens.
"""

from __future__ import annotations

import numpy as np

from moelab.claims.heldout import two_level_bootstrap
from moelab.claims.models import final
from moelab.claims.record import ClaimResult
from moelab.claims.registry import row
from moelab.claims.rmoe8 import describe, rmoe8_run, seeds, trace_arrays
from moelab.claims.layerwise import bootstrap_stat, depth_trend, diversity_LT, mantel_r2, per_sequence, top1_largest_norm
from moelab.claims.verdict import Claim, Measure
from moelab.claims.workspace import Workspace

ALL_EXPERT_TOKENS = 16384


def _all_expert_trace(ws: Workspace, seed: int, columns: tuple[str, ...]):
    tokens = min(ws.scale.trace_tokens or ALL_EXPERT_TOKENS, ALL_EXPERT_TOKENS)
    # Shared among the held-out split's domains: its first 16,384 tokens are mostly code (published until
    # 2026-12-07 that way, with the same models).
    path = ws.trace(final(rmoe8_run(ws, "linear", seed)), f"rmoe8-linear-s{seed}-all", all_experts=True,
                    tokens=tokens)
    seq_T, cols = trace_arrays(path, columns)
    seqs_S = np.unique(seq_T)
    counts_S = np.bincount(np.searchsorted(seqs_S, seq_T), minlength=len(seqs_S)).astype(float)
    return seq_T, seqs_S, counts_S, cols


def _setup(ws: Workspace, n: int, tokens: float | None = None) -> str:
    traced = (f" All-experts traces of {int(tokens):,} held-out tokens per seed, shared among the split's domains."
              if tokens else "")
    return (f"Linear-router (SMoE) models of the RMoE rows, seeds 0-{n - 1}: {describe(rmoe8_run(ws, 'linear', 0))}. "
            f"{ws.scale.describe()}.{traced}")


def norm_preference_of(seq_T: np.ndarray, seqs_S: np.ndarray, cols: dict) -> tuple[np.ndarray, ...]:
    """One model's all-experts trace: (per-sequence count of (token, layer) whose top-1 expert has the
    largest output norm, the null per layer, the share per layer, the score-rank x norm-rank table)."""
    from moelab.analysis.dynamic import rank_table

    same_LT, null_L = top1_largest_norm(cols["probs"], cols["expert_norms"])
    table = sum(rank_table(p, q) for p, q in zip(cols["probs"], cols["expert_norms"]))
    return per_sequence(same_LT.sum(axis=0).astype(float), seq_T, seqs_S), null_L, same_LT.mean(axis=1), table


@row("closer-norm-preference", "A Closer Look")
def norm_preference(ws: Workspace) -> ClaimResult:
    n = seeds(ws, "linear")
    sums, nulls, per_layer, table = [], [], [], None
    for seed in range(n):
        seq_T, seqs_S, counts_S, cols = _all_expert_trace(ws, seed, ("probs", "expert_norms"))
        s, null_L, share_L, t = norm_preference_of(seq_T, seqs_S, cols)
        sums.append(s)
        nulls.append(null_L)
        per_layer.append(share_L)
        table = t if table is None else table + t
    L, E = cols["probs"].shape[0], cols["probs"].shape[2]
    value, lo, hi = two_level_bootstrap(np.array(sums), counts_S * L)
    null = float(np.mean(nulls))
    null_sd = float(np.sqrt(null * (1 - null) / (n * L * counts_S.sum())))
    return ClaimResult(
        row="closer-norm-preference", paper="A Closer Look",
        claim="The router tends to pick the experts whose outputs have the largest norm.",
        paper_number="Rank table C[score rank, norm rank]: strong in Mixtral (top-1 often the largest norm), only at "
                     "the top ranks in DeepSeekMoE, absent in Grok; no single share is given.",
        measured="Share of (token, layer) whose top-1 expert (router probability) also has the largest unweighted "
                 "output norm among all E experts run on the token; null: the top-1 choice shuffled across tokens, "
                 "sum_e P(top-1 = e) P(largest norm = e) per layer (it keeps each expert's load; 1/E when loads are "
                 "even), mean over seeds. Per seed, the share paired with its own null (share - null + mean null); "
                 "95% interval: t over seeds (the two-level bootstrap over seeds and sequences in details).",
        measure=Measure(value, lo, hi, null, null_sd), test=Claim("greater", margin=1.0 / E), seeds=n,
        setup=_setup(ws, n, counts_S.sum()),
        details={"chance_1_over_E": 1.0 / E, "null_per_layer": np.mean(nulls, axis=0).tolist(),
                 "share_per_layer": np.mean(per_layer, axis=0).tolist(),
                 "per_seed_per_layer": [p.tolist() for p in per_layer],
                 "null_per_seed_per_layer": [np.asarray(nl).tolist() for nl in nulls],
                 "rank_table": (table / table.sum(axis=1, keepdims=True)).round(4).tolist(),
                 "rank_table_note": "row: router score rank (0 = top), column: output norm rank; rows sum to 1, "
                                    "summed over layers and seeds; independence puts 1/E in every cell"},
        note=f"Margin 1/E = {1 / E:.4f}: 'tends to pick' asks for the top-1 expert to be the largest-norm one at "
             "least twice as often as the null would.")


@row("closer-neurons-fine-grained", "A Closer Look")
def neurons_fine_grained(ws: Workspace) -> ClaimResult:
    from moelab.analysis.weights import averaged_neurons, cosine_matrix, r_squared, upper
    from moelab.trace.weights import checkpoint_weight_layers

    n = seeds(ws, "linear")
    r2_NL, null_NL, sd_NL, other = [], [], [], {"up": [], "down": []}
    rng = np.random.default_rng(0)
    for seed in range(n):
        layers = checkpoint_weight_layers(final(rmoe8_run(ws, "linear", seed)))
        row_r2, row_null, row_sd = [], [], []
        for lay in layers:
            avg = averaged_neurons(lay["w_up_EFD"], lay["w_gate_EFD"], lay["w_down_EDF"])
            router_EE = cosine_matrix(lay["w_router_ED"])
            r2, null, sd = mantel_r2(router_EE, cosine_matrix(avg["gate"]), rng)
            row_r2.append(r2), row_null.append(null), row_sd.append(sd)
            for p in other:
                other[p].append(r_squared(upper(router_EE), upper(cosine_matrix(avg[p]))))
        r2_NL.append(row_r2), null_NL.append(row_null), sd_NL.append(row_sd)
    r2_NL, null_NL, sd_NL = np.array(r2_NL), np.array(null_NL), np.array(sd_NL)
    value, lo, hi = two_level_bootstrap(r2_NL, np.ones(r2_NL.shape[1]))
    E = layers[0]["w_router_ED"].shape[0]
    return ClaimResult(
        row="closer-neurons-fine-grained", paper="A Closer Look",
        claim="Neurons act like fine-grained experts: the router's rows resemble the experts' gate projections.",
        paper_number="R^2 of router-row cosine vs averaged-neuron cosine, mean over layers: Mixtral gate 0.33 "
                     "(up 0.06, down 0.07); DeepSeekMoE gate 0.40 (up and down 0.00).",
        measured="Per layer, R^2 of the E(E-1)/2 pairwise cosines of the router's rows on those of the experts' "
                 "averaged W_gate neurons, mean over layers and seeds; null: the same R^2 with the router's experts "
                 "relabelled (a Mantel permutation, 200 draws, which keeps both similarity structures). 95% interval: "
                 "t over seeds (the two-level bootstrap over seeds and layers in details).",
        measure=Measure(value, lo, hi, float(null_NL.mean()), float(np.sqrt((sd_NL ** 2).mean() / sd_NL.size))),
        test=Claim("greater", margin=0.1), seeds=n, setup=_setup(ws, n),
        details={"gate_r2_per_seed_per_layer": r2_NL.round(4).tolist(), "null_per_layer": null_NL.mean(0).tolist(),
                 "up_r2_mean": float(np.mean(other["up"])), "down_r2_mean": float(np.mean(other["down"])),
                 "independent_pairs_null": 1.0 / (E * (E - 1) // 2 - 1)},
        note="Margin 0.1: above the up/down R^2 (0.06-0.07) that the paper reads as no resemblance, so a gate R^2 "
             "that counts must clear them.")


@row("closer-diversity-depth", "A Closer Look")
def diversity_depth(ws: Workspace) -> ClaimResult:
    n = seeds(ws, "linear")
    sums_NLS = []
    for seed in range(n):
        seq_T, seqs_S, counts_S, cols = _all_expert_trace(ws, seed, ("expert_cos",))
        div_LT = diversity_LT(cols["expert_cos"])
        sums_NLS.append([per_sequence(d_T, seq_T, seqs_S) for d_T in div_LT])
    sums_NLS = np.array(sums_NLS)
    L = sums_NLS.shape[1]
    value, lo, hi = bootstrap_stat(sums_NLS, counts_S, depth_trend)
    drop = bootstrap_stat(sums_NLS, counts_S, lambda d: float(d[-1] - d[-2]))
    div_NL = sums_NLS.sum(axis=2) / counts_S.sum()
    return ClaimResult(
        row="closer-diversity-depth", paper="A Closer Look",
        claim="Expert outputs grow more diverse with depth, except at the last layer.",
        paper_number="Output similarity of experts falls with depth (diversity rises) in Mixtral, DeepSeekMoE and "
                     "Grok, then rises again at the last layer; read from figures, no single number.",
        measured=f"Diversity per layer = 1 - mean angular similarity 1 - arccos(cos)/pi of all expert pairs' outputs "
                 f"on the same token; Spearman correlation of diversity with depth over layers 0..{L - 2} (the last "
                 f"layer excluded as the paper's exception); null 0 (no trend; ± the sd of Spearman over a random "
                 f"order of {L - 1} layers). 95% interval: t over seeds (the two-level bootstrap over seeds and "
                 "sequences in details).",
        measure=Measure(value, lo, hi, 0.0, 1 / np.sqrt(L - 2)), test=Claim("greater", margin=0.5), seeds=n,
        setup=_setup(ws, n, counts_S.sum()),
        details={"diversity_per_layer": div_NL.mean(0).tolist(), "per_seed_per_layer": div_NL.round(5).tolist(),
                 "last_layer_minus_previous": dict(zip(("value", "ci_low", "ci_high"), drop)),
                 "per_seed_trend": [depth_trend(d) for d in div_NL]},
        note="Margin 0.5: 'rises with depth' asks for a clearly monotone trend, more than one null sd "
             f"({1 / np.sqrt(L - 2):.2f}) of a random order. The last layer's change is in the details "
             "(negative: the paper's exception holds).")
