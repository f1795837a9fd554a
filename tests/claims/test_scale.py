"""The scale profiles: cpu keeps today's sizes, gpu's sizes and time estimates by hand, groups, the CLI's
--scale / --device / --plan, and the two scales side by side in the table."""

import dataclasses
import json
from pathlib import Path

import pytest

from runner_loader import runner
from moelab.claims import scale as sc
from moelab.claims.workspace import Scale
from moelab.config import MoelabError

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_profile_is_todays_default():
    assert sc.scale_for("cpu", "rmoe8") == Scale() and sc.scale_for("cpu", "base", smoke=True) == Scale.smoke()
    s = Scale()  # the committed table was made at these sizes: a profile must not move them
    assert (s.steps, s.seq_len, s.batch_size, s.vocab_size, s.max_bytes_per_source, s.seeds, s.corpus) == (
        400, 128, 16, 4096, 1_000_000, 3, "main")


def test_gpu_sizes_by_hand():
    base, rmoe, up = (sc.scale_for("gpu", g) for g in ("base", "rmoe8", "upcycle"))
    assert base.corpus == "python-large" and base.seeds == 3
    w = sc.workload("base", base)
    assert w["tokens_per_run"] == 480 * 128 * 256 == 15_728_640  # tens of millions: >= 10M per model
    assert w["runs"] == {"tiny": 6} and w["train_tokens"] == 6 * 15_728_640
    assert sc.workload("upcycle", up)["train_tokens"] == 3 * (240 + 240 + 480) * 128 * 256
    assert sc.workload("rmoe8", rmoe)["runs"] == {"rmoe8": 12}
    for g in sc.GROUPS:  # 18x / 4.8x the cpu scale's 819,200 tokens per model
        assert sc.workload(g, sc.scale_for("gpu", g))["tokens_per_run"] > 4 * 400 * 16 * 128


def test_gpu_estimate_by_hand_and_under_budget():
    s = sc.scale_for("gpu", "upcycle")
    w = sc.workload("upcycle", s, heldout=100_000)
    a = dict(sc.ASSUMED)
    e = sc.estimate_seconds(w, a)
    # 6 tiny runs x 480 steps x 0.06 s + 6 x 4 s fixed + corpus 150 s + 6 traces of 100k tokens at 1M/s
    # + their rows (100k x 6 x 2 blocks x top-2) at 200k rows/s
    assert e["total"] == pytest.approx(6 * 480 * 0.06 + 6 * 4 + 150 + 0.6 + 2.4e6 / 2e5)
    for g in sc.GROUPS:
        assert sc.estimate_seconds(sc.workload(g, sc.scale_for("gpu", g)))["total"] <= sc.GPU_BUDGET_MIN * 60
    slower = dict(a, step_s={"tiny": 0.6, "rmoe8": 1.0})  # a 10x slower card blows the budget: the check can fail
    assert sc.estimate_seconds(sc.workload("base", sc.scale_for("gpu", "base")), slower)["total"] > 8 * 60


def test_plan_prints_tokens_and_minutes(capsys):
    assert runner().main(["--scale", "gpu", "--plan"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [l.split(":")[0] for l in lines] == list(sc.GROUPS)
    assert "15.7M tokens per run" in lines[0] and "min on one H200" in lines[0]


def test_groups_cover_rows_by_module():
    from moelab.claims.registry import all_rows

    rows = all_rows()
    expanded = sc.expand_groups(["upcycle", "rmoe8"])
    assert expanded[0] == "upcycle-specialises-less"
    rmoe8 = {n for n, r in rows.items() if r.fn.__module__.endswith(("rows_rmoe", "rows_closer", "rows_layers"))}
    assert set(expanded[1:]) == rmoe8
    assert set(sc.expand_groups(list(sc.GROUPS))) == set(rows)  # every row is in one group
    assert sc.expand_groups(["openmoe-moe-beats-dense"]) == ["openmoe-moe-beats-dense"]


def test_every_row_module_is_named_and_rows_sharing_runs_share_a_scale():
    """A module in no group used to fall back to "base": at the gpu scale the OLMoE per-layer rows and the
    depth scan trained the rmoe8 runs at the base group's 480 steps (the rmoe8 group's are 120), at the same
    folders, so each group retrained the other's models and the per-layer rows read other models than
    the RMoE rows they say they share."""
    from moelab.claims.registry import MODULES

    named = [m for ms in sc.GROUPS.values() for m in ms]
    assert sorted(named) == sorted(MODULES) and len(set(named)) == len(named)
    rmoe8_rows = sc.group_of("moelab.claims.rows_rmoe")
    for module in ("rows_layers", "rows_depth"):  # they read rmoe8_run's models (depth 8: the same runs)
        g = sc.group_of(f"moelab.claims.{module}")
        for profile in sc.PROFILES:
            assert sc.scale_for(profile, g) == sc.scale_for(profile, rmoe8_rows)
    assert sc.group_of("moelab.claims.rows_chatdrop") == "long"  # the drop rows' 2048-token runs
    assert sc.group_of("moelab.claims.rows_turns") == "long"
    with pytest.raises(MoelabError, match="rows_unnamed"):
        sc.group_of("moelab.claims.rows_unnamed")
    w = sc.workload("depth", sc.scale_for("gpu", "depth"))
    assert w["runs"] == {"rmoe2": 6, "rmoe4": 6, "rmoe8": 6}  # 3 depths x linear, GRU x 3 seeds
    assert sc.workload("denseref", sc.scale_for("gpu", "denseref"))["runs"] == {"rmoe8": 3}


@pytest.mark.parametrize("argv, says", [
    (["--scale", "bogus", "--list"], "unknown scale 'bogus'"),
    (["--scale", "gpu", "--device", "tpu", "--list"], "--device 'tpu' is unknown"),
])
def test_bad_scale_or_device_is_one_line(argv, says, capsys):
    assert runner().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


def test_cuda_without_cuda_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(MoelabError, match=f"--device {name}: CUDA is not available here"):
            sc.check_device(name)
    sc.check_device("cpu") or sc.check_device(None)


def _result(row, values, paper="OpenMoE"):
    from moelab.claims.record import ClaimResult
    from moelab.claims.verdict import Claim, Measure

    return ClaimResult(row=row, paper=paper, claim="c.", paper_number="p", measured="m",
                       measure=Measure(0.0, 0.0, 0.0, 0.0), test=Claim(direction="greater", margin=0.1),
                       setup="s", seeds=len(values), seed_values=list(values))


def test_table_side_by_side_and_waiting_line():
    from moelab.claims.table import GPU_WAITING, render

    cpu = {"a-row": _result("a-row", [0.5, 0.6, 0.7]), "b-row": _result("b-row", [0.01, -0.02, 0.0])}
    alone = render(cpu, ["a-row", "b-row"])
    assert alone.count(GPU_WAITING) == 1 and "## Both scales" not in alone
    gpu = {"b-row": _result("b-row", [0.5, 0.52, 0.51])}
    both = render(cpu, ["a-row", "b-row"], gpu=gpu, gpu_about="GPU scale (planted).")
    # Everything of the cpu table stays; the waiting line gives way to the side-by-side section.
    without = both.replace(GPU_WAITING + "\n", "").split("## Both scales")[0]
    assert without == alone.replace(GPU_WAITING + "\n", "").split("## Rows in detail")[0]
    section = both.split("## Both scales")[1].split("## Rows in detail")[0]
    a_line = next(l for l in section.splitlines() if l.startswith("| a-row"))
    b_line = next(l for l in section.splitlines() if l.startswith("| b-row"))
    assert a_line.endswith("| not run | - | - |") and "reproduced" in a_line
    assert cpu["b-row"].verdict != gpu["b-row"].verdict and f"**{gpu['b-row'].verdict}**" in b_line
    assert "GPU scale (planted)." in section


def test_gpu_results_and_about_read_back(tmp_path):
    from moelab.claims.record import write_result

    write_result(_result("b-row", [0.5, 0.52, 0.51]), tmp_path)
    (tmp_path / sc.ABOUT).mkdir()
    (tmp_path / sc.ABOUT / "base.json").write_text(json.dumps(
        {"group": "base", "device": "NVIDIA H200", "date": "2026-12-05 10:00 UTC", "torch": "2.11.0",
         "describe": "480 steps", "corpus": {"fingerprint": "abc"}}))
    results, caption = sc.read_gpu(tmp_path)
    assert set(results) == {"b-row"} and "NVIDIA H200, 2026-12-05 10:00 UTC" in caption and "abc" in caption
    assert sc.read_gpu(tmp_path / "none") == ({}, "")
    for damaged in ('{"group": "base", "dev', '{"group": "base"}', '[1]'):  # cut short, a key missing, a list
        (tmp_path / sc.ABOUT / "base.json").write_text(damaged)
        with pytest.raises(MoelabError, match="base.json is not a gpu group's about file"):
            sc.read_gpu(tmp_path)


def test_gpu_profile_at_smoke_size_trains_and_traces_on_the_device(tmp_path, monkeypatch, one_torch_thread):
    """The gpu profile's code path (python-large corpus, --device) with tiny numbers on this CPU."""
    from moelab.claims.models import final
    from moelab.claims.workspace import Workspace
    from moelab.data import corpus_large as cl

    small = cl.Recipe(packages=("packaging",), stdlib=False, math_count=50, vocab_size=512, max_bytes=60_000,
                      tokenizer_sample_bytes=200_000)
    monkeypatch.setattr(Workspace, "large_recipe", lambda self, vocab_size=None: small)
    s = dataclasses.replace(sc.scale_for("gpu", "base", smoke=True), threads=1, steps=3, seeds=1)
    ws = Workspace(tmp_path, s, device="cpu", log=lambda m: None)
    corpus = ws.corpus()
    assert cl.read_manifest(corpus)["versions"]["packaging"] and corpus.parent.name == "python-large"
    run = ws.run("tiny-moe-s0", "tiny-moe")
    stamp = json.loads((run / "claims-settings.json").read_text())
    assert "train.device=cpu" in stamp["settings"]["sets"]
    trace = ws.trace(final(run), "t")
    assert json.loads((trace.parent / "claims-settings.json").read_text())["settings"]["device"] == "cpu"
    assert Workspace(tmp_path, s, log=lambda m: None).corpus() == corpus  # cached: same recipe and versions
    other = ws.corpus("other", ["math:40"])  # a row's own corpus keeps its sources under the gpu profile
    assert other.parent.name == "other" and cl.read_manifest(other) is None
    with pytest.raises(MoelabError, match="scale.corpus='bogus' is unknown"):
        Workspace(tmp_path, dataclasses.replace(s, corpus="bogus")).corpus()
    about = json.loads(sc.write_about(tmp_path / "res", {"base": ws}, "cpu", {"base": 90.0})[0].read_text())
    assert about["rows_wall_min"] == 1.5 and about["estimated_min"] > 0
    assert about["device"] == "CPU (cpu)" and about["corpus"]["fingerprint"] == cl.read_manifest(corpus)["fingerprint"]
    assert about["scale"]["corpus"] == "python-large" and about["plan"].startswith("base: 6 tiny runs")


def test_cli_renders_gpu_results_beside_the_committed_cpu_ones(tmp_path):
    from moelab.claims.record import read_results, write_result

    committed = read_results(ROOT / "docs" / "claims")
    name = "openmoe-moe-beats-dense"
    planted = dataclasses.replace(committed[name], seed_values=[0.31, 0.33, 0.32], details={}, previous_verdict="")
    write_result(planted, tmp_path / "gpu")
    before = (ROOT / "docs" / "CLAIMS.md").read_bytes()
    assert runner().main(["--scale", "gpu", "--table-only", "--results", str(tmp_path / "gpu"),
                          "--table", str(tmp_path / "T.md")]) == 0
    md = (tmp_path / "T.md").read_text()
    line = next(l for l in md.split("## Both scales")[1].splitlines() if l.startswith(f"| {name} "))
    assert "0.32 [" in line and committed[name].verdict in line  # the GPU value beside the CPU verdict
    assert "GPU scale: waits" not in md and (ROOT / "docs" / "CLAIMS.md").read_bytes() == before
