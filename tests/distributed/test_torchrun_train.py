"""`torchrun -m moelab train` in 2 (and 4) CPU processes against the same run in one process.

The overrides make one process and the mesh compute the same thing: `group` capacity with one sequence
per group (drops decided per sequence, see test_parallel.py) and no balance loss (a nonlinear function
of the whole batch's load). Checkpoints are the single-file format, so any world size resumes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from moelab.train.commands import build_run_config
from moelab.train.loop import train

SETS = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=128",
        "model.moe.expert_hidden=64", "model.moe.capacity_formula=group", "model.moe.group_size=32",
        "model.moe.balance_coef=0", "data.seq_len=32", "data.batch_size=4", "train.device=cpu",
        "train.tensorboard=false", "train.eval_tokens=256", "train.log_every=1", "train.warmup_steps=1",
        "parallel.timeout_s=60"]


def torchrun(n: int, corpus, out: Path, steps: int, sets: list[str], resume=None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "moelab", "train", "--preset", "tiny-moe", "--data", str(corpus), "--out", str(out),
           "--steps", str(steps)] + [a for s in SETS + sets for a in ("--set", s)]
    cmd += ["--resume", str(resume)] if resume else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def one_process(corpus, out: Path, steps: int, resume=None):
    run = build_run_config("tiny-moe", str(corpus), SETS + [f"train.steps={steps}"])
    return train(run, out, resume_from=resume, show_progress=False)


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_ep2_run_matches_one_process_and_resumes_at_1(corpus_dir, tmp_path):
    ref = one_process(corpus_dir, tmp_path / "ref", steps=3)
    # The same number of steps as the reference: the learning-rate schedule depends on it.
    torchrun(2, corpus_dir, tmp_path / "ep2", 3, ["parallel.ep=2", "train.save_every=2"])
    ckpt2 = tmp_path / "ep2" / "checkpoints" / "step_000002"
    assert (ckpt2 / "dcp" / ".metadata").is_file(), "the sharded DCP copy is written next to the export"
    losses = train_losses(tmp_path / "ep2")
    assert len(losses) == 3, "one writer: each step logged once"
    assert abs(losses[0] - ref.losses[0]) < 1e-5
    assert max(abs(a - b) for a, b in zip(losses, ref.losses)) < 1e-4
    assert_same_weights(tmp_path / "ep2" / "checkpoints" / "step_000003", ref.final_checkpoint, atol=1e-4)
    # The world-2 checkpoint is the whole model in the single-file format: it resumes in one process.
    resumed = one_process(corpus_dir, tmp_path / "resumed1", steps=3, resume=ckpt2)
    assert abs(resumed.losses[0] - ref.losses[2]) < 1e-4
    assert_same_weights(resumed.final_checkpoint, ref.final_checkpoint, atol=1e-4)
    assert (tmp_path / "ep2" / "eval.json").is_file()


def test_dp2_ep2_resumes_a_world_2_checkpoint(corpus_dir, tmp_path):
    ref = one_process(corpus_dir, tmp_path / "ref", steps=3)
    torchrun(2, corpus_dir, tmp_path / "dp2", 3, ["parallel.dp=2", "train.save_every=2"])
    ckpt2 = tmp_path / "dp2" / "checkpoints" / "step_000002"
    torchrun(4, corpus_dir, tmp_path / "w4", 3, ["parallel.dp=2", "parallel.ep=2"], resume=ckpt2)
    assert abs(train_losses(tmp_path / "w4")[0] - ref.losses[2]) < 1e-4
    assert_same_weights(tmp_path / "w4" / "checkpoints" / "step_000003", ref.final_checkpoint, atol=1e-4)


def test_fsdp2_run_matches_one_process(corpus_dir, tmp_path):
    ref = one_process(corpus_dir, tmp_path / "ref", steps=3)
    torchrun(2, corpus_dir, tmp_path / "fsdp", 3, ["parallel.dp=2", "parallel.dp_mode=fsdp"])
    assert max(abs(a - b) for a, b in zip(train_losses(tmp_path / "fsdp"), ref.losses)) < 1e-4
    assert_same_weights(tmp_path / "fsdp" / "checkpoints" / "step_000003", ref.final_checkpoint, atol=1e-4)
