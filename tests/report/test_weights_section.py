"""The weight section of a model with a dense block of the experts' width: the reference row in the
similarity heatmaps, the PCA figure, both reorderings named apart, and captions that say what is computed."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.analysis import coactivation, weight_analysis
from moelab.analysis.weights import reorder_pairs_within
from moelab.model.config import ModelConfig, MoEConfig
from moelab.model.transformer import build_model
from moelab.report.html import FigureBlock, Table
from moelab.report.sections import coactivation_section
from moelab.report.weights_figures import with_reference
from moelab.report.weights_section import weight_definition_headlines, weight_section
from moelab.trace.weights import model_weight_layers

E = 4


@pytest.fixture(scope="module")
def weights():
    moe = MoEConfig(num_experts=E, top_k=2, dense_layers=[0], expert_hidden=16)
    model = build_model(ModelConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2, ffn_hidden=16,
                                    max_seq_len=16, moe=moe), seed=0)
    return weight_analysis(model_weight_layers(model), reorder_pairs=reorder_pairs_within(E, 16))


def test_reference_row_is_drawn_and_named(weights):
    lay = weights.layers[0]
    assert lay.reference == "dense FFN of block 0"
    m = with_reference(lay.matrix_cos["up"], lay.matrix_ref_cos["up"])
    assert m.shape == (E + 1, E + 1) and np.isnan(np.diag(m)).all()
    np.testing.assert_allclose(m[E, :E], lay.matrix_ref_cos["up"])
    section = weight_section(weights, "ckpt")
    figures = [b for b in section.blocks if isinstance(b, FigureBlock)]
    heat = figures[0].figure
    labels = [t.get_text() for t in heat.axes[0].get_xticklabels()]
    assert labels[-1] == "ref" and len(labels) == E + 1
    assert "dense FFN of block 0" in figures[0].caption
    titles = [f.figure.get_suptitle() for f in figures]
    assert any("PCA of z-scored" in t for t in titles)
    assert any("flattened matrices after matching" in t for t in titles)
    tables = [b for b in section.blocks if isinstance(b, Table)]
    captions = " ".join(t.caption for t in tables)
    assert "its Table 2" in captions and "not comparable" in captions and "3/E" in captions


def test_headlines_carry_their_random_init_levels(weights):
    heads = {h.key: h for h in weight_definition_headlines(weights)}
    rmoe = heads["rmoe_expert_similarity"]
    assert rmoe.value == pytest.approx(np.mean([lay.rmoe_similarity for lay in weights.layers]))
    assert rmoe.null == pytest.approx(3 / E) and "3/E" in rmoe.text
    reorder = heads["reorder_paper:up"]
    assert reorder.null == pytest.approx(weights.layers[0].paper_reorder.null_after["up"])
    assert "matching of noise" in reorder.text


def test_coactivation_caption_says_all_pairs():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(E, 2, replace=False) for _ in range(50)])
    batch = {"seq": np.repeat(np.arange(50), 2), "pos": np.zeros(100, np.int64), "layer": np.zeros(100, np.int64),
             "rank": np.tile([0, 1], 50), "expert": ids.reshape(-1)}
    section = coactivation_section({"coactivation": coactivation(batch, [E], 2)})
    caption = section.blocks[0].caption
    assert "all pairs" in caption.lower() and "adjacent ranks" in caption
