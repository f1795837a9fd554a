"""A Closer Look's expert output similarity by layer, against the dense reference.

A Closer Look studies Mixtral beside Mistral 7B, the dense model it is taken to be upcycled from, and runs
every expert on the real hidden state of each layer (its dynamic analysis; angular similarity
1 - arccos(cos)/pi of outputs on the same input). Its finding (3): expert outputs grow more diverse with
depth, except at the last layer. Against the dense reference the same reading is: how far the experts'
outputs have moved from the dense FFN they started as, layer by layer. The setting here is the one that
has a dense reference: per seed, an 8-block dense model (the RMoE rows' width: D = 64, FFN hidden 64)
trains for half the steps, is upcycled into the RMoE rows' SMoE (every block MoE, top-2 of 16, plain
copies of the dense FFN, linear router) and trains for the other half. The upcycled MoE reads held-out
text; at each MoE layer, on the hidden state its experts see, every expert and the dense model's FFN of
the same block are run, and the row compares their outputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moelab.claims.layerwise import depth_trend
from moelab.claims.models import final, train_curve
from moelab.claims.preconditions import loss_near, mean_curve, settled
from moelab.claims.record import ClaimResult
from moelab.claims.registry import row
from moelab.claims.rmoe8 import MODEL, describe
from moelab.claims.seeds import t_interval
from moelab.claims.verdict import Claim, Measure, Precondition
from moelab.claims.workspace import Workspace

TOKENS = 16384  # held-out tokens per seed: every expert runs on each of them at every layer
DENSE = ("model.n_layers=8", "model.d_model=64", "model.n_heads=4", "model.ffn_hidden=64")
MOE_DATA_SEED = 1000  # the MoE phase reads other batches than the dense phase (as rows_upcycle)
MIN_LAYERS = 4
MARGIN = 0.5  # a clearly monotone trend over depth (closer-diversity-depth's margin)


def angular(a_ND: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    """A Closer Look's angular similarity 1 - arccos(cos)/pi of matching rows (1 same direction, 0.5
    orthogonal, 0 opposite)."""
    cos = F.cosine_similarity(a_ND.double(), b_ND.double(), dim=-1).clamp(-1, 1)
    return 1 - torch.arccos(cos) / math.pi


@torch.no_grad()
def expert_outputs(layer, x_TD: torch.Tensor) -> torch.Tensor:
    """Every expert's unweighted output on x (T x E x D), as the all-experts trace computes it."""
    from moelab.model.experts import gated_activation

    ex = layer.experts
    return torch.stack([gated_activation(x_TD @ ex.w_in_EDX[e], ex.kind) @ ex.w_out_EFD[e]
                        for e in range(ex.num_experts)], dim=1)


@torch.no_grad()
def dense_reference_similarity(moe, dense, input_ids_BS: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(to_dense_LT, between_LT): per MoE layer and token, the mean over experts of the angular similarity
    of an expert's output to the dense FFN's output of the same block, and the mean over expert pairs of
    the experts' similarity to each other, all on the hidden state the MoE layer's experts see."""
    layers = moe.moe_layers()
    seen: dict[int, torch.Tensor] = {}
    hooks = [l.register_forward_hook(lambda m, args, out: seen.__setitem__(m.layer, args[0].detach()))
             for l in layers]
    try:
        moe(input_ids_BS)
    finally:
        for h in hooks:
            h.remove()
    to_dense, between = [], []
    for l in layers:
        x_TD = seen[l.layer]
        y_TED = expert_outputs(l, x_TD)
        ref_TD = dense.blocks[l.layer].ffn(x_TD)
        T, E, D = y_TED.shape
        to_dense.append(angular(y_TED.reshape(T * E, D), ref_TD.repeat_interleave(E, 0)).view(T, E).mean(1))
        iu, ju = torch.triu_indices(E, E, offset=1)
        between.append(angular(y_TED[:, iu].reshape(-1, D), y_TED[:, ju].reshape(-1, D)).view(T, -1).mean(1))
    return torch.stack(to_dense).numpy(), torch.stack(between).numpy()


ROUNDING = 1e-5  # departures this close are equal: arccos near cos = 1 turns float rounding into ~1e-6


def departure_trend(to_dense_L: np.ndarray) -> float:
    """Spearman of (1 - similarity to the dense FFN) with depth over all layers but the last (the paper's
    exception), as closer-diversity-depth reads diversity; NaN when the departures are equal within
    rounding (experts that are still the dense FFN have no order)."""
    d = 1.0 - np.asarray(to_dense_L, np.float64)
    if len(d) > 1 and np.ptp(d[:-1]) <= ROUNDING:
        return float("nan")
    return depth_trend(d)


# ---- the runs: dense (half the steps) -> upcycled SMoE (the other half) ---------------------------------
def _moe_sets(seed: int) -> list[str]:
    return [o for o in MODEL if o.startswith("model.moe.")] + ["model.moe.router.kind=linear", f"upcycle.seed={seed}"]


def upcycled_pair(ws: Workspace, seed: int) -> dict[str, Path]:
    from moelab.train.checkpoint import read_checkpoint_config

    s = ws.scale
    half = max(1, s.steps // 2)
    dense = ws.run(f"denseref8-dense-s{seed}", "tiny-dense", overrides=list(DENSE), seed=seed, steps=half)
    init = ws.upcycled(f"denseref8-init-s{seed}", dense, "tiny-moe", _moe_sets(seed))
    moe = ws.run(f"denseref8-moe-s{seed}", "tiny-moe", seed=MOE_DATA_SEED + seed, init_from=init,
                 model=read_checkpoint_config(init)["model"], steps=s.steps - half)
    return {"dense": dense, "moe": moe}


def measure_seed(ws: Workspace, pair: dict[str, Path], tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer means over the first `tokens` held-out tokens of (similarity to the dense FFN, between-expert
    similarity); the last batch is cut there, so the count the caption states is the count averaged."""
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.train.checkpoint import load_model

    moe, dense = load_model(final(pair["moe"])).eval(), load_model(final(pair["dense"])).eval()
    to_dense, between, seen = [], [], 0
    for batch in iter_sequential(load_corpus(ws.corpus()), seq_len=ws.scale.seq_len, batch_size=ws.scale.batch_size,
                                 split="heldout"):
        a, b = dense_reference_similarity(moe, dense, batch["input_ids"])
        to_dense.append(a), between.append(b)
        seen += a.shape[1]
        if seen >= tokens:
            break
    return np.concatenate(to_dense, axis=1)[:, :tokens].mean(1), np.concatenate(between, axis=1)[:, :tokens].mean(1)


# The upcycled MoE's loss may move by at most this share of itself over the last 20% of its training.
SETTLED_SHARE = 0.01


def converged(curves: list[np.ndarray], layers: int) -> Precondition:
    """Mixtral's regime: a trained model, not one still moving. The upcycled MoE's training loss (mean
    over seeds) moved by less than 1% of its final value over the last 20% of training (`settled`'s
    equivalence test), and there are layers to order."""
    mean = mean_curve(curves)
    end = mean[:, 0].max()
    final_loss = loss_near(mean, end, max((end - mean[:, 0].min()) / 10, 1))
    flat = settled(mean, "the upcycled MoE's training loss (mean over seeds)", SETTLED_SHARE * final_loss)
    return Precondition(needs=f">= {MIN_LAYERS} MoE layers and {flat.needs}",
                        measured=f"{layers} MoE layers; {flat.measured}", met=flat.met and layers >= MIN_LAYERS)


@row("closer-dense-reference", "A Closer Look")
def dense_reference(ws: Workspace) -> ClaimResult:
    n = ws.scale.seeds
    tokens = min(ws.scale.trace_tokens or TOKENS, TOKENS)
    pairs = [upcycled_pair(ws, seed) for seed in range(n)]
    to_dense_NL, between_NL = map(np.array, zip(*[measure_seed(ws, p, tokens) for p in pairs]))
    trends = [departure_trend(t) for t in to_dense_NL]
    L = to_dense_NL.shape[1]
    last = [float(t[-2] - t[-1]) for t in 1 - to_dense_NL]  # departure falls at the last layer: positive
    return ClaimResult(
        row="closer-dense-reference", paper="A Closer Look",
        claim="Against the dense reference: the experts' outputs move further from the dense FFN's output with "
              "depth (finding 3's rising diversity); the last layer, the paper's exception, is left out of the "
              "trend and its change is in the details.",
        paper_number="Mixtral 8x7B read beside Mistral 7B, its dense reference; finding (3): expert output similarity "
                     "falls with depth, then rises at the last layer (figures; the reference notes give no number "
                     "for the dense comparison).",
        measured=f"Per MoE layer, the mean over experts and {tokens:,} held-out tokens of the angular similarity "
                 "1 - arccos(cos)/pi between an expert's unweighted output and the dense model's FFN output of the same "
                 "block, both on the hidden state the MoE layer's experts see. Per seed, Spearman correlation of the "
                 f"departure (1 - similarity) with depth over layers 0..{L - 2} (the last layer is the paper's "
                 "exception). Null 0 (no trend; ± the sd of Spearman over a random order of the layers). 95% interval: "
                 "t over seeds. Details: per-layer similarity to the dense FFN and between experts, per seed.",
        measure=Measure(float(np.nanmean(trends)), float("nan"), float("nan"), 0.0, 1 / np.sqrt(max(L - 2, 1))),
        test=Claim("greater", margin=MARGIN), unit="", seed_values=trends, seeds=n,
        precondition=converged([train_curve(p["moe"]) for p in pairs], L),
        setup=(f"Per seed: tiny-dense at 8 blocks, D 64, FFN hidden 64, {max(1, ws.scale.steps // 2)} steps; upcycled "
               f"(plain copies, router N(0, 0.02)) into {describe(pairs[0]['moe'])}, trained "
               f"{ws.scale.steps - max(1, ws.scale.steps // 2)} more steps on other batches. {ws.scale.describe()} "
               "in all, main corpus."),
        details={"similarity_to_dense_per_seed_per_layer": to_dense_NL.round(5).tolist(),
                 "between_experts_per_seed_per_layer": between_NL.round(5).tolist(),
                 "last_layer_departure_drop_per_seed": last,
                 "last_layer_drop_t_interval": list(t_interval(last))},
        note=f"Margin {MARGIN}: 'moves further with depth' asks for a clearly monotone trend, as closer-diversity-depth. "
             "At step 0 every expert is the dense FFN (similarity 1 at every layer); the router and the MoE phase's "
             "training move them. The precondition asks for a settled run: Mixtral is a converged model.")
