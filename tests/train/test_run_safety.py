"""Runs that race, diverge or run out of disk (issue 24 items 13, 14, 15, 17): two runs into one folder
(the second refused in one line), NaN gradients at a finite loss (stopped before the update), a full disk
while a checkpoint is written (one line naming the folder and the free space, earlier checkpoints intact),
and `train --init` from a checkpoint of another tokenizer (refused, as eval, trace and intervene do)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError
from safetensors.torch import load_file

from moelab.cli import main
from moelab.train import checkpoint as ck
from moelab.train.rundir import LOCK_NAME, list_checkpoints, lock_run_dir


def _argv(tiny_run, out, train_args, steps=2, *extra, data="corpus"):
    return ["train", "--preset", str(tiny_run / "tiny.toml"), "--data", str(tiny_run / data),
            "--out", str(out), *train_args(steps=steps), *extra]


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "error" in line]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_nan_gradient_at_a_finite_loss_stops_before_the_update(tiny_run, tmp_path, train_args, capsys):
    """lr=1e30: the first update leaves finite but huge weights; the second step's loss is still finite
    while its gradient norm is NaN. Applying it would make every weight NaN (main exited 0 with such a
    final checkpoint)."""
    out = tmp_path / "r"
    assert main(_argv(tiny_run, out, train_args, 3, "--save-every", "1", "--set", "train.lr=1e30")) == 2
    (line,) = _error_lines(capsys)
    assert "training diverged: the gradient norm is nan (at a finite loss" in line and "at step 2" in line, line
    kept = list_checkpoints(out)
    assert [p.name for p in kept] == ["step_000001"] and f"last good checkpoint is {kept[0]}" in line
    assert all(bool(t.isfinite().all()) for t in load_file(str(kept[0] / "model.safetensors")).values())
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] < 2 for r in rows)  # the step that would have applied it logged nothing


def test_a_run_folder_held_by_another_run_is_refused(tiny_run, tmp_path, train_args, capsys):
    out = tmp_path / "r"
    held = lock_run_dir(out)  # what a running `train` holds (flock: another open file conflicts, as a process)
    try:
        assert main(_argv(tiny_run, out, train_args, 1)) == 2
        (line,) = _error_lines(capsys)
        assert f"run folder {out} is in use by process {os.getpid()}" in line, line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing
        assert main(_argv(tiny_run, out, train_args, 1, "--overwrite")) == 2  # not even when told to overwrite
    finally:
        held.release()
    assert main(_argv(tiny_run, out, train_args, 1)) == 0  # once free, the folder can be used
    capsys.readouterr()


def test_the_lock_decides_when_both_found_the_folder_empty(tiny_run, tmp_path, train_args, capsys, monkeypatch):
    """The race itself: run B checks the empty folder, then run A takes it while B builds its model; B
    must not write beside A (main: both exited 0 with one run's config and the other's checkpoints)."""
    import moelab.train.loop as loop

    out, held = tmp_path / "r", []
    real = loop._sampler

    def a_arrives(*args, **kwargs):  # between B's first check and B's first write
        held.append(lock_run_dir(out))
        (out / "config.json").write_text("{}")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_sampler", a_arrives)
    try:
        assert main(_argv(tiny_run, out, train_args, 1)) == 2
        (line,) = _error_lines(capsys)
        assert f"run folder {out} is in use by process {os.getpid()}" in line, line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "config.json"]
        assert (out / "config.json").read_text() == "{}"
    finally:
        held[0].release()


def test_two_concurrent_runs_into_one_folder(tiny_run, tmp_path, train_args, capsys):
    """A real second process: run A trains (long); run B, started while A writes, is refused in one line
    and A's folder holds A's config only."""
    out = tmp_path / "r"
    src = str(Path(ck.__file__).parents[2])
    code = f"import sys; sys.path.insert(0, {src!r}); from moelab.cli import main; sys.exit(main(sys.argv[1:]))"
    a = subprocess.Popen([sys.executable, "-c", code, *_argv(tiny_run, out, train_args, 100_000)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").is_file():  # A holds the lock before it writes its config
            assert a.poll() is None and time.monotonic() < deadline, a.stderr.read().decode() if a.poll() else "slow"
            time.sleep(0.1)
        assert main(_argv(tiny_run, out, train_args, 1)) == 2
        (line,) = _error_lines(capsys)
        assert f"is in use by process {a.pid}" in line, line
        assert json.loads((out / "config.json").read_text())["train"]["steps"] == 100_000  # A's, not B's
    finally:
        a.terminate()
        a.wait(timeout=60)


@pytest.mark.parametrize("failure", ["safetensors", "enospc"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last(tiny_run, tmp_path, train_args, capsys,
                                                                          monkeypatch, failure):
    real, calls, digests = ck.save_file, [0], {}

    def save_file(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint's weights: the disk is full
            if failure == "safetensors":
                raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                      'message: "No space left on device" })')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", save_file)
    out = tmp_path / "r"
    assert main(_argv(tiny_run, out, train_args, 3, "--save-every", "1")) == 2
    (line,) = _error_lines(capsys)
    ckdir = out / "checkpoints"
    assert f"could not write checkpoint {ckdir / 'step_000002'}: no space left on device" in line, line
    assert f"free in {ckdir})" in line and ("GiB free" in line or "MiB free" in line), line
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_000001"]  # no step_000002.tmp left behind
    first = ckdir / "step_000001"
    digests = _digest(first)
    monkeypatch.setattr(ck, "save_file", real)
    assert ck.load_model(first) is not None and _digest(first) == digests
    assert main(_argv(tiny_run, tmp_path / "resumed", train_args, 2, "--resume", str(first))) == 0  # resumable


def test_init_from_a_checkpoint_of_another_tokenizer_is_refused(tiny_run, tmp_path, train_args, capsys):
    """tiny_run's `other` corpus has the same vocabulary size (512) from another tokenizer."""
    ckpt = tiny_run / "run" / "checkpoints" / "step_000002"
    assert main(_argv(tiny_run, tmp_path / "r", train_args, 1, "--init", str(ckpt), data="other")) == 2
    (line,) = _error_lines(capsys)
    assert "was tokenized by another tokenizer" in line and str(ckpt) in line, line
    assert not (tmp_path / "r").exists()
    assert main(_argv(tiny_run, tmp_path / "same", train_args, 1, "--init", str(ckpt))) == 0  # its own corpus
