"""The "Expert weights" section and its headline numbers: A Closer Look's and RMoE's definitions as the
papers wrote them, moelab's own variants named apart, each number beside its random-init level."""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.report import figures as F
from moelab.report import weights_figures as WF
from moelab.report.headline import Headline, fmt, layer_mean
from moelab.report.html import FigureBlock, Note, Section, Table

PARTS = ("up", "gate", "down")


def _reference_sentence(weights: Any) -> str:
    refs = sorted({lay.reference for lay in weights.layers if lay.reference})
    if not refs:
        return " The model has no dense FFN of the experts' width, so there is no reference row."
    return (f" The last row and column, \"ref\", is the dense reference of the same width ({'; '.join(refs)}), "
            "as A Closer Look compares experts with the dense FFN.")


def weight_section(weights: Any, checkpoint: str, note: str = "") -> Section:
    lay0 = weights.layers[0]
    ref = _reference_sentence(weights)
    blocks: list[Any] = [
        FigureBlock(WF.expert_similarity_heatmap(weights, "matrix"),
                    "Cosine between two experts' flattened up / gate / down matrices per layer (diagonal hidden); "
                    f"white is 0, what independent random initialisations give (one pair spreads by "
                    f"+-{fmt(lay0.matrix_null_sd, '.3f')} there).{ref}"),
        FigureBlock(WF.expert_similarity_heatmap(weights, "averaged"),
                    "The same with each expert reduced to its mean neuron (A Closer Look's neuron averaging); "
                    f"white is 0, the random-init level (one pair spreads by +-{fmt(lay0.averaged_null_sd, '.3f')})."
                    + ref)]
    if weights.router_r2_mean:
        blocks.append(FigureBlock(F.router_r2_bars(weights),
                                  "R^2 of the line relating two experts' router-row cosine to the cosine of their "
                                  "averaged up / gate / down neurons, over expert pairs; dashed is 1/(pairs - 1), "
                                  "what unrelated similarities give."))
    elif note:
        blocks.append(Note(note))
    blocks.append(FigureBlock(WF.pca_scatter(weights),
                              "A Closer Look's projection: each expert's flattened matrix, every entry z-scored over "
                              "the experts (and the reference), on the top two principal components; the title gives "
                              "the share of variance each explains beside 1/(N - 1), what N exchangeable random "
                              "experts give each component."))
    if any(lay.paper_reorder is not None and len(lay.paper_reorder.pairs) > 1 for lay in weights.layers):
        blocks.append(FigureBlock(WF.paper_reorder_heatmap(weights),
                                  "A Closer Look's neuron reordering: each matrix's neurons matched on their own "
                                  "(linear assignment on the neuron cosine), then the cosine of the flattened "
                                  "matrices; white is what the same matching reaches on Gaussian noise of this shape, "
                                  "grey marks pairs not matched (large experts: the first pairs only)."))
    blocks += _reorder_tables(weights) + [_similarity_table(weights)]
    return Section("Expert weights", f"Static analyses of the checkpoint {checkpoint} (A Closer Look, RMoE).", blocks)


def _reorder_tables(weights: Any) -> list[Table]:
    paper, joint = [], []
    for l, lay in enumerate(weights.layers):
        pr = lay.paper_reorder
        if pr is not None:
            for p in PARTS:
                paper.append([l, p, len(pr.pairs), fmt(pr.mean_before[p], ".3f"), fmt(pr.mean_after[p], ".3f"),
                              f"{fmt(pr.null_after[p], '.3f')} +- {fmt(pr.null_after_sd, '.3f')}",
                              f"{fmt(pr.mean_tau[p], '.3f')} (0 +- "
                              f"{fmt(pr.null_tau_sd, '.3f')})"])
        if lay.joint_reorder:
            m = list(lay.joint_reorder.values())
            joint.append([l, len(m), fmt(np.mean([x.mean_neuron_cos_before for x in m]), ".3f"),
                          fmt(np.mean([x.mean_neuron_cos_after for x in m]), ".3f"), fmt(m[0].null_after, ".3f"),
                          fmt(np.mean([x.kendall_tau for x in m]), ".3f")])
    if not paper:
        return []
    return [Table(["layer", "matrix", "pairs", "flattened cosine as stored (random 0)", "after matching",
                   "matching of Gaussian noise (+- one pair's sd)", "Kendall tau (order-blind 0 +- sd)"], paper,
                  "Neuron reordering as A Closer Look defines it (its Table 2): each matrix matched on its own, "
                  "the cosine of the flattened matrices; means over the expert pairs matched."),
            Table(["layer", "pairs", "mean neuron cosine, same index", "after one joint matching",
                   "matching of Gaussian noise", "Kendall tau"], joint,
                  "moelab's joint variant, not comparable with the paper's numbers: ONE matching on the "
                  "concatenated [up | gate | down^T] neurons and the mean of per-neuron cosines.")]


def _similarity_table(weights: Any) -> Table:
    rows = []
    for l, lay in enumerate(weights.layers):
        rows.append([l, f"{fmt(lay.rmoe_similarity, '.3f')}", f"{fmt(lay.rmoe_null, '.3f')} +- "
                     f"{fmt(lay.rmoe_null_sd, '.3f')}"]
                    + [fmt(lay.gram_mean_offdiag[p], ".3f") for p in PARTS]
                    + [f"0 +- {fmt(lay.gram_offdiag_null_sd, '.3f')}"])
    return Table(["layer", "RMoE expert similarity", "random init 3/E", "moelab: up, pairs i<j", "gate", "down",
                  "random init"], rows,
                 "RMoE's expert similarity (its code): the averaged up, gate and down neurons, each normalised, "
                 "concatenated, and the mean of the E x E Gram matrix with its diagonal (so identical experts give "
                 "3 and random ones 3/E). moelab's per-part variant beside it: the mean cosine of averaged neurons "
                 "over pairs i < j (random 0).")


def weight_definition_headlines(weights: Any) -> list[Headline]:
    """RMoE's similarity and the paper's reordering, each with its random-init level."""
    v, n = weights.rmoe_similarity_mean, weights.rmoe_null_mean
    sd = layer_mean([lay.rmoe_null_sd for lay in weights.layers])
    out = [Headline("rmoe_expert_similarity", "RMoE expert similarity", v, n,
                    f"RMoE expert similarity {fmt(v, '.3f')} (random init 3/E = {fmt(n, '.3f')} +- {fmt(sd, '.3f')})")]
    reorder = [lay.paper_reorder for lay in weights.layers if lay.paper_reorder is not None]
    if reorder:
        after = {p: layer_mean([r.mean_after[p] for r in reorder]) for p in PARTS}
        null = layer_mean([r.null_after["up"] for r in reorder])
        out.append(Headline("reorder_paper:up", "reordered flattened cosine (up)", after["up"], null,
                            "neuron reordering (A Closer Look), flattened cosine after matching: "
                            + " / ".join(f"{p} {fmt(after[p], '.3f')}" for p in PARTS)
                            + f" (matching of noise {fmt(null, '.3f')})"))
    return out
