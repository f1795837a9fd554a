"""benchmarks/device_session.sh, the GPU session's prepared calls, run at toy sizes on the CPU so they cannot
rot between sessions that have a GPU."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_session.sh"


def _run(*args, out: Path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    env = {**os.environ, "OUT": str(out)}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def test_workers_part_writes_a_trace_and_times_one_and_two_workers(tmp_path):
    done = _run("workers", "--tiny", out=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "workers.log").read_text().splitlines()
    timed = [json.loads(line) for line in log if line.startswith("{")]
    assert [r["workers"] for r in timed] == [1, 2] and all(r["rows"] == 65536 and r["wall_s"] > 0 for r in timed)
    assert any(line.startswith("2 workers vs 1: wall ratio") for line in log)
    machine = (tmp_path / "machine.txt").read_text()
    assert "torch" in machine and "UTC" in machine and "/dev/shm: " in machine and "joinable True" in machine
    host = json.loads((tmp_path / "trace_host.json").read_text())
    assert [(r["probs"], r["encoders"]) for r in host["rows"]] == [
        (mode, n) for mode in ("none", "top:8", "full") for n in (1, 2, 4)]
    assert all(r["pipeline_tokens_s"] > 0 and r["sync_tokens_s"] > 0 for r in host["rows"])


def test_gpu_part_runs_gpu_check_and_passes_its_arguments_on(tmp_path):
    done = _run("gpu", "--tiny", "--only", "experts-bf16", out=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert rows and {r["check"] for r in rows} == {"experts-bf16"} and all(r["ok"] for r in rows)
    assert "experts-bf16" in (tmp_path / "gpu_check.log").read_text()
    machine = (tmp_path / "machine.txt").read_text()
    assert "\ncc: " in machine and "\nPython.h: " in machine  # what inductor needs on the GPU machine


def test_gpu_part_is_stopped_before_the_device_s_call_limit(tmp_path):
    """`timeout` ends gpu_check before the device tool would kill the whole call (its status, 124, comes back);
    here a limit of 1 s stands for the 560 s one."""
    if shutil.which("timeout") is None:
        pytest.skip("no timeout(1)")
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_TIMEOUT_S": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "gpu", "--tiny"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 124, done.stdout + done.stderr


def test_no_part_named_is_one_line_and_status_2(tmp_path):
    for args in ([], ["train"]):
        done = _run(*args, out=tmp_path)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "gpu or workers" in done.stderr
