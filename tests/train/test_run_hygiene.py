"""Run folders hold one run: reuse is refused or explicit, only complete checkpoints are found, a resume
cannot go past train.steps, a diverging run stops, and checkpoints know their corpus's tokenizer."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file

from moelab.cli import main
from moelab.train import checkpoint as ck


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(tiny_run / "run", dst)
    return dst


def _train_argv(tiny_run, out, train_args, steps=2, *extra):
    return ["train", "--preset", str(tiny_run / "tiny.toml"), "--data", str(tiny_run / "corpus"),
            "--out", str(out), *train_args(steps=steps), *extra]


def test_a_non_empty_run_folder_is_refused_unless_overwrite(tiny_run, run_copy, train_args, capsys):
    before = sorted(p.relative_to(run_copy) for p in run_copy.rglob("*"))
    metrics = (run_copy / "metrics.jsonl").read_text()
    assert main(_train_argv(tiny_run, run_copy, train_args, 1)) == 2
    err = _err(capsys)
    assert len(err) == 1 and "is not empty" in err[0] and "--overwrite" in err[0], err
    assert sorted(p.relative_to(run_copy) for p in run_copy.rglob("*")) == before
    assert (run_copy / "metrics.jsonl").read_text() == metrics
    # --overwrite: a 1-step run leaves no trace of the older run's step_000002
    assert main(_train_argv(tiny_run, run_copy, train_args, 1, "--overwrite")) == 0
    assert [p.name for p in ck_list(run_copy)] == ["step_000001"]
    assert {json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()} == {1}


def test_overwrite_never_deletes_what_the_run_reads_nor_files_no_run_wrote(tiny_run, run_copy, tmp_path,
                                                                            train_args, capsys):
    def tree(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

    # the corpus inside --out: --overwrite would have emptied the folder, corpus and all, then failed
    nest = tmp_path / "nest"
    shutil.copytree(tiny_run / "corpus", nest / "corpus")
    before = tree(nest)
    argv = ["train", "--preset", str(tiny_run / "tiny.toml"), "--data", str(nest / "corpus"), "--out", str(nest),
            *train_args(steps=1), "--overwrite"]
    assert main(argv) == 2
    err = _err(capsys)
    assert len(err) == 1 and "--overwrite would delete" in err[0] and "--data" in err[0], err
    assert tree(nest) == before
    # an --init checkpoint among the run's own checkpoints (a run folder's only files, yet read by the run)
    init = run_copy / "checkpoints" / "step_000001"
    before = tree(run_copy)
    assert main(_train_argv(tiny_run, run_copy, train_args, 1, "--init", str(init), "--overwrite")) == 2
    err = _err(capsys)
    assert len(err) == 1 and "--init" in err[0] and "lies inside" in err[0], err
    assert tree(run_copy) == before
    # a file no run writes: the folder is not (only) a run folder, so it is not emptied
    (run_copy / "notes.txt").write_text("mine")
    before = tree(run_copy)
    assert main(_train_argv(tiny_run, run_copy, train_args, 1, "--overwrite")) == 2
    err = _err(capsys)
    assert len(err) == 1 and "notes.txt" in err[0] and "empties only a run folder" in err[0], err
    assert tree(run_copy) == before and (run_copy / "notes.txt").read_text() == "mine"


def ck_list(run):
    from moelab.train.rundir import list_checkpoints

    return list_checkpoints(run)


def test_resume_continues_its_own_folder_and_drops_redone_metric_rows(tiny_run, tmp_path, train_args):
    run = tmp_path / "run"
    assert main(_train_argv(tiny_run, run, train_args, 2, "--save-every", "1", "--set", "train.log_every=1")) == 0
    shutil.rmtree(run / "checkpoints" / "step_000002")  # as if the run died after step 2's metrics
    first = run / "checkpoints" / "step_000001"
    assert main(_train_argv(tiny_run, run, train_args, 3, "--resume", str(first), "--set", "train.log_every=1")) == 0
    run_copy = run
    steps = [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3]  # the old run's step-2 row went; the resumed run logged 2 and 3 once


def test_resume_refuses_a_folder_with_later_checkpoints(tiny_run, run_copy, train_args, capsys):
    first = run_copy / "checkpoints" / "step_000001"
    assert main(_train_argv(tiny_run, run_copy, train_args, 3, "--resume", str(first))) == 2
    err = _err(capsys)
    assert len(err) == 1 and "already holds step_000002" in err[0], err
    assert main(_train_argv(tiny_run, run_copy, train_args, 3, "--resume", str(first), "--overwrite")) == 2
    assert "--overwrite would delete" in _err(capsys)[0]


def test_resume_past_train_steps_is_one_line_and_writes_nothing(tiny_run, tmp_path, train_args, capsys):
    last = tiny_run / "run" / "checkpoints" / "step_000002"
    for steps in (1, 2):
        out = tmp_path / f"r{steps}"
        assert main(_train_argv(tiny_run, out, train_args, steps, "--resume", str(last))) == 2
        err = _err(capsys)
        assert len(err) == 1 and "is at step 2, which is not before train.steps" in err[0], err
        assert not out.exists()


def test_unfinished_checkpoints_are_never_taken(tiny_run, run_copy, capsys):
    # What a kill -9 during the write of step 3 leaves: a .tmp folder, even with weights in it.
    stale = run_copy / "checkpoints" / "step_000003.tmp"
    shutil.copytree(run_copy / "checkpoints" / "step_000002", stale)
    from moelab.train.commands import resolve_checkpoint

    assert resolve_checkpoint(run_copy).name == "step_000002"
    assert "ignoring unfinished checkpoint" in capsys.readouterr().err
    assert main(["eval", str(run_copy), "--data", str(tiny_run / "corpus"), "--tokens", "16"]) == 0


def test_train_removes_leftovers_when_it_resumes(tiny_run, run_copy, train_args, capsys):
    stale = run_copy / "checkpoints" / "step_000003.tmp"
    stale.mkdir()
    last = run_copy / "checkpoints" / "step_000002"
    assert main(_train_argv(tiny_run, run_copy, train_args, 3, "--resume", str(last))) == 0
    assert not stale.exists() and "removing unfinished checkpoint" in capsys.readouterr().err


def test_checkpoint_files_and_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    import torch

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    final = ck.save_checkpoint(tmp_path / "step_000001", model, {"model": {}}, 1, opt)
    tmp = str(final) + ".tmp"
    replace_at = events.index(("replace", tmp))
    synced = {path for kind, path in events[:replace_at] if kind == "fsync"}
    assert {f"{tmp}/{name}" for name in os.listdir(final)} | {tmp} <= synced
    assert ("fsync", str(tmp_path)) in events[replace_at:]  # the rename itself is made durable


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tiny_run, tmp_path, train_args, capsys):
    out = tmp_path / "r"
    argv = _train_argv(tiny_run, out, train_args, 6, "--save-every", "1", "--set", "train.lr=1e12",
                       "--set", "train.grad_clip=0", "--set", "train.warmup_steps=0")
    assert main(argv) == 2
    err = _err(capsys)
    line = [e for e in err if "error" in e]
    assert len(line) == 1 and "training diverged" in line[0] and "at step" in line[0], err
    step = int(line[0].split("at step ")[1].split(";")[0])
    kept = ck_list(out)
    assert [p.name for p in kept] == [f"step_{s:06d}" for s in range(1, step)]
    assert f"last good checkpoint is {kept[-1]}" in line[0]
    assert all(bool(t.isfinite().all()) for t in load_file(str(kept[0] / "model.safetensors")).values())


def test_eval_and_trace_refuse_a_corpus_of_another_tokenizer(tiny_run, tmp_path, capsys):
    run, other = tiny_run / "run", tiny_run / "other"
    assert json.loads((other / "corpus.json").read_text())["tokenizer"]["vocab_size"] == 512  # same size
    for argv in (["eval", str(run), "--data", str(other), "--tokens", "16"],
                 ["trace", str(run), "--data", str(other), "--tokens", "16", "--out", str(tmp_path / "t.parquet")]):
        assert main(argv) == 2
        err = _err(capsys)
        assert len(err) == 1 and "another tokenizer" in err[0], err
    assert not (tmp_path / "t.parquet").exists()


def test_checkpoint_stores_the_resolved_corpus_and_generate_works_elsewhere(tiny_run, tmp_path, monkeypatch,
                                                                              capsys):
    cfg = ck.read_checkpoint_config(tiny_run / "run" / "checkpoints" / "step_000002")
    assert cfg["data"]["path"] == str((tiny_run / "corpus").resolve())
    assert cfg["tokenizer"]["fingerprint"] == json.loads(
        (tiny_run / "corpus" / "corpus.json").read_text())["tokenizer"]["fingerprint"]
    monkeypatch.chdir(tmp_path)
    run = tiny_run / "run"
    assert main(["generate", str(run), "--prompt", "def f", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", "def f", "--max-new-tokens", "3", "--temperature", "0",
                 "--tokenizer", str(tiny_run / "corpus" / "tokenizer.json")]) == 0
    assert capsys.readouterr().out == greedy and greedy.startswith("def f")
    assert main(["generate", str(run), "--prompt", "def f", "--tokenizer",
                 str(tiny_run / "other" / "tokenizer.json")]) == 2
    assert "is not the one checkpoint" in _err(capsys)[0]
