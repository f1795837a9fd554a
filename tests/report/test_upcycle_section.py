"""The expert-symmetry section: the run's logged expert cosine read back per layer and step, plotted in
the report of a `--weights` checkpoint; none for a run that logged none; a corrupt metrics file is one error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moelab.config import MoelabError
from moelab.model.config import ModelConfig, MoEConfig
from moelab.model.transformer import build_model
from moelab.model.upcycle import expert_cosine
from moelab.report.build import build_report
from moelab.report.upcycle_section import read_expert_cosine, run_metrics
from moelab.train.checkpoint import save_checkpoint

from .conftest import E, html_sections, write_planted


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reader_pairs_layers_and_steps(tmp_path):
    rows = [{"kind": "train", "step": 2, "loss": 3.0},
            {"kind": "eval", "step": 8, "moe1/expert_cosine": 0.5, "moe0/expert_cosine": 0.25},
            {"kind": "eval", "step": 4, "moe0/expert_cosine": 0.75},  # an eval before: sorted by step
            {"kind": "eval", "step": 8, "moe1/expert_cosine": 0.4}]  # the same step again: the last wins
    traj = read_expert_cosine(write_rows(tmp_path / "metrics.jsonl", rows))
    assert traj.steps.tolist() == [4, 8] and traj.layers == [0, 1]
    np.testing.assert_array_equal(traj.cosine_LS, [[0.75, 0.25], [np.nan, 0.4]])


def test_reader_nothing_to_plot_and_corrupt_file(tmp_path):
    dense = write_rows(tmp_path / "dense.jsonl", [{"kind": "eval", "step": 4, "all/loss": 2.0}])
    assert read_expert_cosine(dense) is None  # a dense run: nothing, not an error
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "eval", "step": 1}\n{"step": 2, "moe0/expert_cosine": 0.\n')
    with pytest.raises(MoelabError, match="line 2 is not a metrics row"):
        read_expert_cosine(bad)
    assert run_metrics(tmp_path / "nowhere") is None


@pytest.fixture
def moe_run(tmp_path):
    """A run folder: a real MoE checkpoint and metrics rows with the trainer's own cosine keys."""
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=32,
                      moe=MoEConfig(num_experts=E, top_k=2, expert_hidden=16))
    model = build_model(cfg, seed=0)
    run = tmp_path / "run"
    ckpt = save_checkpoint(run / "checkpoints" / "step_000006", model, {"model": cfg.to_dict()}, 6)
    logged = expert_cosine(model)  # what loop._eval_row writes: moe<i>/expert_cosine
    assert set(logged) == {"moe0/expert_cosine", "moe1/expert_cosine"}
    planted = {3: {k: 0.9 - 0.1 * i for i, k in enumerate(sorted(logged))}, 6: logged}
    write_rows(run / "metrics.jsonl", [{"kind": "eval", "step": s, "all/loss": 1.0, **v} for s, v in planted.items()])
    return ckpt, planted, cfg.to_dict()


def test_report_plots_the_runs_cosine(moe_run, tmp_path):
    ckpt, planted, config = moe_run
    trace = write_planted(tmp_path / "t.parquet", config=config)  # a trace of the checkpoint's model
    metrics = build_report([trace], tmp_path / "out", weights=[ckpt], options={"analyses": ("load",)})
    got = next(iter(metrics["models"].values()))["expert_cosine"]
    assert got["steps"] == [3, 6]
    for layer in ("moe0", "moe1"):
        assert got["layers"][layer] == pytest.approx([planted[3][f"{layer}/expert_cosine"],
                                                      planted[6][f"{layer}/expert_cosine"]])
    page = (tmp_path / "out" / "report.html").read_text()
    assert html_sections(page).get("Expert symmetry over training") == 1


def test_no_section_without_logged_cosine(moe_run, tmp_path):
    ckpt, _, config = moe_run
    write_rows(ckpt.parent.parent / "metrics.jsonl", [{"kind": "eval", "step": 6, "all/loss": 1.0}])
    trace = write_planted(tmp_path / "t.parquet", config=config)
    metrics = build_report([trace], tmp_path / "out", weights=[ckpt], options={"analyses": ("load",)})
    assert next(iter(metrics["models"].values()))["expert_cosine"] is None
    assert "Expert symmetry over training" not in html_sections((tmp_path / "out" / "report.html").read_text())


def test_corrupt_run_metrics_fail_before_anything_is_written(moe_run, tmp_path):
    ckpt, _, config = moe_run
    (ckpt.parent.parent / "metrics.jsonl").write_text('{"step": 3, "moe0/expert_cosine": 0.\n')
    trace = write_planted(tmp_path / "t.parquet", config=config)
    with pytest.raises(MoelabError, match="metrics.jsonl: line 1"):
        build_report([trace], tmp_path / "out", weights=[ckpt], options={"analyses": ("load",)})
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_model_is_refused_before_any_analysis(moe_run, tmp_path):
    """Its weight section would describe another model beside this trace's routing."""
    ckpt, _, config = moe_run
    other = dict(config, d_model=32)
    trace = write_planted(tmp_path / "t.parquet", config=other)
    with pytest.raises(MoelabError, match=r"another model than the one trace .* model.d_model \(16 vs 32\)"):
        build_report([trace], tmp_path / "out", weights=[ckpt], options={"analyses": ("load",)})
    assert not (tmp_path / "out").exists()
    # The layers' own check (any trace, transformers' too), run after loading, before the routing passes:
    # the trace has 2 MoE layers of E experts each.
    from moelab.trace.io import open_trace
    from moelab.report.build import check_weights_fit

    meta = open_trace(trace).meta
    layers = [{"w_up_EFD": np.zeros((E + 1, 2, 3)), "block": 0}, {"w_up_EFD": np.zeros((E, 2, 3)), "block": 1}]
    with pytest.raises(MoelabError, match=rf"does not fit trace .* have \[{E + 1}, {E}\] experts"):
        check_weights_fit(layers, meta, "ck", str(trace))
    check_weights_fit([dict(l, w_up_EFD=np.zeros((E, 2, 3))) for l in layers], meta, "ck", str(trace))
    with pytest.raises(MoelabError, match="does not fit"):
        check_weights_fit(layers[:1], meta, "ck", str(trace))
