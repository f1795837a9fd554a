"""The weight analyses' definitions side by side on real checkpoints, each beside its random-init level
and beside the same model freshly initialised (what training changed), with the time they take.

    python benchmarks/weight_definitions.py CKPT_OR_RUN [...] [--init-seed 0]

Per checkpoint, means over MoE layers of: A Closer Look's per-matrix neuron reordering (flattened cosine
after matching, up / gate / down) and moelab's joint variant (mean per-neuron cosine), RMoE's expert
similarity (concatenated normalised parts, random 3/E) and moelab's per-part Gram means, the matrix-level
cosine, the z-scored PCA's top-two share, and each expert's cosine with the dense reference FFN.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moelab.analysis.weights import reorder_pairs_within, weight_analysis
from moelab.model.config import ModelConfig
from moelab.model.transformer import build_model
from moelab.train.checkpoint import read_checkpoint_config
from moelab.train.commands import resolve_checkpoint
from moelab.trace.weights import checkpoint_weight_layers, model_weight_layers

PARTS = ("up", "gate", "down")


def off_diagonal_mean(m: np.ndarray) -> float:
    return float(m[~np.eye(len(m), dtype=bool)].mean())


def summary(res) -> dict[str, str]:
    """One string per definition: the mean over layers, with its random-init level."""
    lays = res.layers

    def per_part(fn) -> str:
        return " / ".join(f"{np.nanmean([fn(lay, p) for lay in lays]):.3f}" for p in PARTS)

    pr = [lay.paper_reorder for lay in lays if lay.paper_reorder is not None]
    joint = np.mean([np.mean([m.mean_neuron_cos_after for m in lay.joint_reorder.values()]) for lay in lays])
    joint_null = np.mean([next(iter(lay.joint_reorder.values())).null_after for lay in lays])
    gram_sd = np.mean([lay.gram_offdiag_null_sd for lay in lays])
    pca_null = 2 * np.mean([lay.pca["up"].null_explained for lay in lays])
    out = {
        "matrix cosine, pairs (random 0)": per_part(lambda lay, p: off_diagonal_mean(lay.matrix_cos[p])),
        "paper reordering, flattened cos after": per_part(lambda lay, p: lay.paper_reorder.mean_after[p]),
        "  its noise level (+- one pair)": f"{np.mean([r.null_after['up'] for r in pr]):.3f} +- "
                                           f"{np.mean([r.null_after_sd for r in pr]):.3f}",
        "paper reordering, Kendall tau": per_part(lambda lay, p: lay.paper_reorder.mean_tau[p]),
        "joint reordering, mean neuron cos after": f"{joint:.3f} (noise {joint_null:.3f})",
        "RMoE expert similarity": f"{res.rmoe_similarity_mean:.4f} (random 3/E = {res.rmoe_null_mean:.4f} +- "
                                  f"{np.mean([lay.rmoe_null_sd for lay in lays]):.4f})",
        "moelab per-part Gram mean, pairs": per_part(lambda lay, p: lay.gram_mean_offdiag[p])
                                            + f" (random 0 +- {gram_sd:.3f})",
        "PCA top-2 share (z-scored)": per_part(lambda lay, p: float(np.sum(lay.pca[p].explained)))
                                      + f" (exchangeable {pca_null:.3f})",
    }
    if all(lay.reference for lay in lays):
        out[f"cos with reference ({lays[0].reference.split(' of ')[0]})"] = per_part(
            lambda lay, p: float(np.mean(lay.matrix_ref_cos[p])))
    return out


def analyse(layers) -> tuple[object, float]:
    E, F = layers[0]["w_up_EFD"].shape[:2]
    t0 = time.perf_counter()
    res = weight_analysis(layers, reorder_pairs=reorder_pairs_within(E, F))
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--init-seed", type=int, default=0, help="seed of the freshly initialised comparison model")
    args = ap.parse_args()
    for path in args.checkpoints:
        ckpt = resolve_checkpoint(path)
        trained, seconds = analyse(checkpoint_weight_layers(ckpt))
        cfg = ModelConfig.from_dict(read_checkpoint_config(ckpt)["model"], path="model")
        init, _ = analyse(model_weight_layers(build_model(cfg, seed=args.init_seed)))
        lay = trained.layers[0]
        E = lay.matrix_cos["up"].shape[0]
        print(f"\n{ckpt}: {len(trained.layers)} MoE layers, E = {E}, "
              f"{len(lay.paper_reorder.pairs)} pairs matched per layer, reference: {lay.reference or 'none'}; "
              f"weight_analysis took {seconds:.2f} s")
        print(f"{'mean over MoE layers (up / gate / down)':<42}{'trained':>46}{'fresh init':>46}")
        a, b = summary(trained), summary(init)
        for key in a:
            print(f"{key:<42}{a[key]:>46}{b.get(key, 'n/a'):>46}")


if __name__ == "__main__":
    main()
