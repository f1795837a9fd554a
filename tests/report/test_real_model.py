"""A report from real moelab models: traces of two tiny models on the same batches and their checkpoints,
compared side by side with the static weight analyses."""

import json

import pytest
import torch

from moelab.analysis import analyze_all, to_json_dict, weight_analysis
from moelab.analysis.weights import reorder_pairs_within
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.transformer import build_model
from moelab.report.build import build_report
from moelab.train.checkpoint import save_checkpoint
from moelab.trace.build import trace_batches, trace_meta
from moelab.trace.io import open_trace
from moelab.trace.weights import checkpoint_weight_layers

from .conftest import assert_self_contained, html_sections

OPTIONS = {"analyses": ("load", "dynamic")}  # the planted report covers the others: fewer figures


def config(router):
    moe = MoEConfig(num_experts=4, top_k=2, moe_every=1, expert_hidden=16, capacity_factor_eval=1.0,
                    router=RouterConfig(kind=router, hidden=8))
    return ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=32, moe=moe)


def batches(n, B=2, S=16):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        ids = torch.randint(0, 50, (B, S), generator=g)
        doc = torch.arange(B).repeat_interleave(S).view(B, S) + i * B
        yield {"input_ids": ids, "labels": ids, "doc": doc, "pos": torch.arange(S).repeat(B, 1),
               "domain_id": (doc % 2).to(torch.int16), "lang_id": torch.zeros(B, S, dtype=torch.int16),
               "turn": torch.full((B, S), -1, dtype=torch.int16)}


def trace_and_save(tmp, router, step, all_experts):
    model = build_model(config(router), seed=step).eval()
    meta = trace_meta(model, 1.0, step, None, "moelab", ["web", "code"], ["en"])
    path = tmp / f"{router}.parquet"
    trace_batches(model, batches(3), path, meta, max_tokens=96, capacity_factor=1.0, all_experts=all_experts)
    ckpt = save_checkpoint(tmp / f"{router}-ckpt", model, {"model": model.config.to_dict()}, step=step)
    return path, ckpt


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    moe, moe_ckpt = trace_and_save(tmp, "linear", 1, all_experts=True)
    rmoe, rmoe_ckpt = trace_and_save(tmp, "rmoe", 2, all_experts=False)
    metrics = build_report([moe, rmoe], tmp / "out", weights=[moe_ckpt, rmoe_ckpt],
                           names=["tiny-moe", "tiny-rmoe"], options=OPTIONS, dpi=60)
    return {"moe": moe, "rmoe": rmoe, "moe_ckpt": moe_ckpt, "rmoe_ckpt": rmoe_ckpt, "out": tmp / "out",
            "metrics": metrics}


def test_compare_report_has_both_models_and_their_weights(real):
    page = (real["out"] / "report.html").read_text()
    assert_self_contained(page)
    sections = html_sections(page)
    assert sections["Comparison"] == 0 and sections["tiny-moe"] == 0 and sections["tiny-rmoe"] == 0
    assert sections["Expert outputs"] == 2 and sections["Expert outputs #2"] == 0  # rmoe traced without
    # matrix and averaged similarity, router R^2, PCA, the paper's reordering over all 6 expert pairs
    assert sections["Expert weights"] == 5
    assert sections["Expert weights #2"] == 4  # the rmoe router has no rows to regress on
    assert "no dense FFN of the experts" in page and "RMoE expert similarity" in page
    assert "the rmoe router has no D-dimensional row per expert" in page
    assert "<li>router rows vs averaged experts R^2" in page
    assert any(line.startswith("tiny-moe: router rows vs") for line in real["metrics"]["summary"])


def test_metrics_match_the_analyses(real):
    saved = json.loads((real["out"] / "metrics.json").read_text())
    assert saved["mode"] == "compare"
    for name, key in (("tiny-moe", "moe"), ("tiny-rmoe", "rmoe")):
        model = saved["models"][name]
        results = analyze_all(open_trace(real[key]), **model["options"])
        assert model["analyses"] == to_json_dict(results)
        assert model["meta"]["checkpoint_step"] == (1 if key == "moe" else 2)
    weights = weight_analysis(checkpoint_weight_layers(real["moe_ckpt"]), reorder_pairs=reorder_pairs_within(4, 16))
    saved_w = saved["models"]["tiny-moe"]["weights"]
    assert saved_w["result"] == json.loads(json.dumps(weights.to_dict()))
    assert saved["models"]["tiny-moe"]["headline"]["router_r2:gate"]["value"] == pytest.approx(
        weights.router_r2_mean["gate"])
    assert saved["models"]["tiny-rmoe"]["headline"]["router_r2:gate"]["value"] is None
    rmoe = saved["models"]["tiny-moe"]["headline"]["rmoe_expert_similarity"]
    assert rmoe["value"] == pytest.approx(weights.rmoe_similarity_mean) and rmoe["null"] == pytest.approx(3 / 4)
    assert len(saved_w["result"]["layers"][0]["paper_reorder"]["pairs"]) == 6
