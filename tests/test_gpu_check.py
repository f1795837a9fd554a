"""benchmarks/gpu_check.py in its --device cpu --tiny mode, so the GPU check cannot rot between GPU runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CHECKS = {"experts-bf16", "layer-bf16", "routing-compile", "peers", "profile", "train-step", "hf-trace",
          "distributed", "real-size"}


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def test_tiny_cpu_run_passes_every_check_and_writes_the_table(tmp_path):
    pytest.importorskip("transformers")
    done = _run("--device", "cpu", "--tiny", "--json", str(tmp_path / "out.json"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["device"] == "cpu" and out["tiny"] is True
    assert {r["check"] for r in out["rows"]} == CHECKS
    assert all(r["ok"] for r in out["rows"])
    rows = {(r["check"], r["what"]): r for r in out["rows"]}
    assert rows[("hf-trace", next(w for c, w in rows if c == "hf-trace"))]["value"] == 1.0
    flops = next(r for r in out["rows"] if r["what"].startswith("model FLOPs per token"))
    assert flops["value"] > 0 and "6 N + 12 L H Q S" in flops["note"]
    # peers: moelab against transformers' eager and grouped_mm blocks at both shapes, fwd and fwd+bwd
    peer = [r for r in out["rows"] if r["check"] == "peers"]
    for family in ("mixtral", "qwen3-moe"):
        for impl in ("eager", "grouped_mm"):
            got = [r for r in peer if r["what"].startswith(family) and r["what"].endswith(f"transformers {impl}")]
            assert len(got) == 2 and all(isinstance(r["value"], float) and r["value"] > 0 for r in got), got
    # four step variants, each with tokens/s, MFU and memory rows; the profiles lie beside the JSON
    steps = [r["what"] for r in out["rows"] if r["check"] == "train-step"]
    assert sum(w.endswith("tokens/s") for w in steps) == 4 and sum(w.endswith("MFU") for w in steps) == 4
    assert sum("peak memory per batch tried" in w for w in steps) == 4
    assert any("compile" in w for w in steps) and any("checkpointing" in w for w in steps)
    for name in ("out.profile_e64_layer.txt", "out.profile_train_step.txt"):
        text = (tmp_path / name).read_text()
        assert "Self CPU" in text and "aten::" in text, name
    # routing-compile: the call and the layer (fwd, fwd+bwd) timed, agreement exact under aot_eager, the decision
    rc = {r["what"].split(":")[0]: r for r in out["rows"] if r["check"] == "routing-compile"}
    assert len(rc) == 5, list(rc)
    timed = [r for r in rc.values() if "compiled / eager" in r["what"] or "compiled routing / eager" in r["what"]]
    assert len(timed) == 3 and all(isinstance(r["value"], float) and r["value"] > 0 for r in timed)
    assert rc["routing compiled vs eager"]["value"] == "1.000000, 1.000000"
    rec = out["routing_compile"]
    assert rec["device_key"] == "cpu" and rec["agreement"] == {"ids": 1.0, "drops": 1.0, "weights": 0.0}
    assert rec["compile"] == (rec["layer_fwd_bwd"] <= 0.97) == rc["decision"]["value"]
    # the printed table has one line per row
    assert sum(line.startswith("| ") for line in done.stdout.splitlines()) == len(out["rows"]) + 1


def test_a_planted_expert_error_fails_the_check(tmp_path, monkeypatch):
    gpu_check = _import_script()
    import moelab.model.experts as experts_mod

    real = experts_mod.GroupedExperts.forward
    monkeypatch.setattr(experts_mod.GroupedExperts, "forward", lambda self, *a, **k: real(self, *a, **k) * 1.05)
    code = gpu_check.main(["--device", "cpu", "--tiny", "--only", "experts-bf16", "--json", str(tmp_path / "o.json")])
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert code == 1
    assert not next(r for r in rows if r["what"].startswith("output"))["ok"]


@pytest.mark.parametrize("args, words", [(["--device", "cuda"], "no CUDA"),
                                         (["--device", "cpu", "--only", "nope"], "unknown check"),
                                         (["--device", "tpu9"], "not a device name"),
                                         (["--device", "cpu", "--json", "/nonexistent/dir/o.json"], "does not exist"),
                                         (["--device", "cpu", "--tiny", "--record"], "full-size run")])
def test_bad_arguments_give_one_line_and_status_2(tmp_path, capsys, args, words):
    import torch

    if args[1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    gpu_check = _import_script()
    code = gpu_check.main(args if "--json" in args else [*args, "--json", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert code == 2 and words in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.json").exists()


def _import_script():
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def test_flop_count_matches_the_parameters_of_the_built_model():
    """6 N + 12 L H Q S, N counted on the built tiny-moe: routed experts at k / E, the input embedding out."""
    from moelab.model.transformer import build_model

    parts = _import_parts()
    model = build_model("tiny-moe", seed=0)
    cfg = model.config
    n = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embed."):
            continue
        routed = ".experts.w_" in name
        n += p.numel() * (cfg.moe.top_k / cfg.moe.num_experts if routed else 1)
    flops, formula = parts.flops_per_token(cfg, 64)
    assert flops == pytest.approx(6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * 64, rel=1e-9)
    assert f"{int(flops):,}" in formula


def test_train_step_falls_back_to_the_batch_that_fits(monkeypatch):
    import torch

    from moelab.model.transformer import MoETransformer

    parts = _import_parts()
    real = MoETransformer.forward

    def small_memory(self, ids, *a, **k):
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (planted)")
        return real(self, ids, *a, **k)

    monkeypatch.setattr(MoETransformer, "forward", small_memory)
    cfg, batch, seconds, steps = parts.fitting_train_step("tiny-moe", 16, torch.device("cpu"), [8, 4, 2, 1], 1)
    assert batch == 2 and steps == 1 and seconds > 0
    with pytest.raises(torch.OutOfMemoryError):
        parts.fitting_train_step("tiny-moe", 16, torch.device("cpu"), [8, 4], 1)


def test_an_oom_after_the_backward_leaves_no_gradient_behind():
    """With bf16 parameters an OOM can strike after the backward filled the model's bf16 gradients (the
    optimizer holds only the fp32 masters): the smaller batch's first step must start from none, or its
    gradient would add the failed try's and its peak memory count them."""
    import torch

    from moelab.model.transformer import MoETransformer
    from moelab.train.precision import MasterWeights

    parts = _import_parts()
    real_fwd, real_move = MoETransformer.forward, MasterWeights.grads_to_master
    leftover = []

    def forward(self, ids, *a, **k):
        leftover.append(any(p.grad is not None for p in self.parameters()))
        return real_fwd(self, ids, *a, **k)

    def grads_to_master(self):
        if len(leftover) == 1:  # the first try's first step, after its backward
            raise torch.OutOfMemoryError("CUDA out of memory (planted, after the backward)")
        return real_move(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MoETransformer, "forward", forward)
        mp.setattr(MasterWeights, "grads_to_master", grads_to_master)
        cfg, batch, seconds, steps = parts.fitting_train_step("tiny-moe", 16, torch.device("cpu"), [4, 2], 1,
                                                              bf16_params=True)
    assert batch == 2 and len(leftover) == 3 and not any(leftover)


def test_a_killed_run_keeps_the_rows_of_the_checks_that_finished(tmp_path, monkeypatch):
    """The JSON is saved after every check, replaced whole: a run stopped at the device's time limit (here a
    planted SystemExit in the second check) still leaves the first check's rows, marked incomplete."""
    gpu_check = _import_script()
    parts = _import_parts()
    out = tmp_path / "o.json"

    def killed(dev, tiny):
        assert json.loads(out.read_text())["rows"][0]["what"] == "first"  # saved before the next check began
        raise SystemExit(124)

    monkeypatch.setattr(gpu_check, "CHECKS", {"a": lambda dev, tiny: [parts.row("a", "first", 1.0, None, True)],
                                              "b": killed})
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu", "--tiny", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and [r["what"] for r in saved["rows"]] == ["first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json"]
    monkeypatch.setattr(gpu_check, "CHECKS", {"a": lambda dev, tiny: [parts.row("a", "first", 1.0, None, True)]})
    assert gpu_check.main(["--device", "cpu", "--tiny", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["complete"] is True


def _import_parts():
    _import_script()
    import gpu_check_parts

    return gpu_check_parts


def test_a_check_past_the_budget_is_a_failed_row_and_runs_nothing(tmp_path):
    gpu_check = _import_script()
    code = gpu_check.main(["--device", "cpu", "--tiny", "--only", "hf-trace,distributed", "--budget-s", "-1",
                           "--json", str(tmp_path / "o.json")])
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert code == 1 and [(r["check"], r["what"], r["ok"]) for r in rows] == [
        ("hf-trace", "not run", False), ("distributed", "not run", False)]
    assert "budget" in rows[0]["value"]


def test_record_keeps_the_other_devices_entries(tmp_path):
    _import_script()
    import gpu_check_routing as routing

    path = tmp_path / "routing_compile.json"
    path.write_text(json.dumps({"about": "x", "devices": {"NVIDIA H200": {"torch": "2.11", "compile": True}}}))
    routing.record("cpu", {"torch": "2.13", "compile": False}, path)
    routing.record("NVIDIA H200", {"torch": "2.11", "compile": False}, path)
    assert json.loads(path.read_text()) == {"about": "x", "devices": {
        "NVIDIA H200": {"torch": "2.11", "compile": False}, "cpu": {"torch": "2.13", "compile": False}}}


def test_a_failing_step_variant_is_one_failed_row_and_the_others_stay(monkeypatch, tmp_path):
    """A variant that cannot run (torch.compile failing on an older torch) must not take the other
    variants' tokens/s, MFU and memory rows with it."""
    import torch

    gpu_check = _import_script()
    parts = _import_parts()
    real = parts.fitting_train_step

    def compile_fails(*a, compile_backend=None, **k):
        if compile_backend is not None:
            raise RuntimeError("train.compile=true: torch.compile failed on this machine (planted)")
        return real(*a, **k)

    monkeypatch.setattr(parts, "fitting_train_step", compile_fails)
    monkeypatch.setattr(parts, "profile_ops", lambda *a, **k: ("aten::mm", 0.5))
    rows = gpu_check.train_step(torch.device("cpu"), True, None, tmp_path / "x.json")
    failed = [r for r in rows if not r["ok"]]
    assert len(failed) == 1 and "compile (blocks)" in failed[0]["what"] and "planted" in failed[0]["note"]
    tokens = [r for r in rows if r["what"].endswith("tokens/s")]
    assert len(tokens) == len(gpu_check.STEP_VARIANTS) - 1 and all(r["ok"] for r in tokens)
    assert rows[1]["what"] == "model FLOPs per token (fwd+bwd)"
