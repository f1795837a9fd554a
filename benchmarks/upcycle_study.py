"""Sparse upcycling on this machine: function preservation, symmetry breaking, loss against from scratch.

Trains a small dense model, upcycles it four ways (exact copies; copies + noise; Drop-Upcycling r=0.5;
granularity 2 with a shared expert) and trains each, plus an MoE from scratch, for the same steps on
the same batches. Prints per variant the step-0 relative output change, the mean expert cosine (over
MoE layers) at each eval and the final held-out loss.

    PYTHONPATH=src python benchmarks/upcycle_study.py [--dense-steps 150] [--moe-steps 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from moelab.data.build import build_corpus
from moelab.data.config import DataConfig
from moelab.model.config import ModelConfig
from moelab.train.checkpoint import read_checkpoint_config
from moelab.train.config import RunConfig, TrainConfig
from moelab.train.loop import train
from moelab.train.upcycle import upcycle_checkpoint

DENSE = {"vocab_size": 1024, "d_model": 64, "n_layers": 4, "n_heads": 4, "ffn_hidden": 256, "max_seq_len": 64}
MOE = {"num_experts": 8, "top_k": 2, "moe_every": 1, "router": {"renormalize": True}}
MOE_TOML = "[model.moe]\nnum_experts = 8\ntop_k = 2\nmoe_every = 1\n[model.moe.router]\nrenormalize = true\n"
VARIANTS = {
    "copies": [],
    "noise 0.5 on 50%": ["upcycle.noise_std=0.5", "upcycle.noise_share=0.5"],
    "drop-upcycling r=0.5": ["upcycle.reinit_ratio=0.5"],
    "G=2 + shared": ["upcycle.granularity=2", "upcycle.shared_expert=true"],
}


def run_config(model: dict, corpus: Path, steps: int) -> RunConfig:
    return RunConfig(model=ModelConfig.from_dict(model), data=DataConfig(path=str(corpus), seq_len=64, batch_size=8),
                     train=TrainConfig(steps=steps, lr=3e-3, warmup_steps=10, eval_every=max(steps // 4, 1),
                                       eval_tokens=4096, tensorboard=False, log_every=10))


def summary(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    up = [r for r in rows if r["kind"] == "upcycle"]
    evals = [r for r in rows if r["kind"] == "eval"]
    cos = [(r["step"], sum(v for k, v in r.items() if k.endswith("expert_cosine"))
            / max(sum(k.endswith("expert_cosine") for k in r), 1)) for r in evals]
    return {"rel_change": up[0]["rel_output_change"] if up else None, "cosine": cos,
            "loss": evals[-1]["all/loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense-steps", type=int, default=150)
    ap.add_argument("--moe-steps", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="upcycle_study_"))
    corpus = root / "corpus"
    if not corpus.exists():
        build_corpus(corpus, ["stdlib-code", "python-docs"], vocab_size=1024, max_bytes_per_source=400_000,
                     heldout_fraction=0.1)
    dense = train(run_config(DENSE, corpus, args.dense_steps), root / "dense", show_progress=False, overwrite=True)
    print(f"dense after {args.dense_steps} steps: held-out loss {dense.eval['all']['loss']:.3f}")
    preset = root / "moe.toml"
    preset.write_text(MOE_TOML)
    results = {}
    for i, (name, sets) in enumerate(VARIANTS.items()):
        up = root / f"up_{i}"
        shutil.rmtree(up, ignore_errors=True)
        ckpt = upcycle_checkpoint(dense.final_checkpoint, str(preset), up, sets)
        model = read_checkpoint_config(ckpt)["model"]
        train(run_config(model, corpus, args.moe_steps), root / f"run_{i}", init_from=ckpt,
              show_progress=False, overwrite=True)
        results[name] = summary(root / f"run_{i}")
    scratch = {**DENSE, "moe": {**MOE, "expert_hidden": 256}}
    train(run_config(scratch, corpus, args.dense_steps + args.moe_steps), root / "run_scratch",
          show_progress=False, overwrite=True)
    results["from scratch (equal tokens)"] = summary(root / "run_scratch")
    print(f"{'variant':<28}{'step-0 rel change':>18}{'final loss':>12}  mean expert cosine at evals")
    for name, r in results.items():
        rc = "-" if r["rel_change"] is None else f"{r['rel_change']:.2e}"
        cos = ", ".join(f"{s}:{c:.3f}" for s, c in r["cosine"])
        print(f"{name:<28}{rc:>18}{r['loss']:>12.3f}  {cos}")


if __name__ == "__main__":
    main()
