"""Whole training steps of the tiny presets against each other (tokens/s as a step-time ratio).

A step is what `train.loop` does per batch: forward with labels and routing, (loss + aux) backward,
gradient clipping, AdamW, zero_grad. Four models step in turn on the same random batch:
tiny-dense, tiny-moe (capacity 1.25 in training, as its preset says), tiny-moe dropless and tiny-rmoe.

    python benchmarks/bench_train_step.py [--batch 8] [--json rows.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

import moelab  # noqa: E402
from moelab.train.config import TrainConfig  # noqa: E402
from moelab.train.optim import build_optimizer  # noqa: E402

BATCH, SEQ = 8, 256  # 2048 tokens a step; seq = the presets' max_seq_len
RMOE_TARGET = 1.05  # RMoE paper: +1.3% step time over the linear router
DROP_TARGET = 1.1


def stepper(preset: str, ids: torch.Tensor, device: str, capacity_factor="auto"):
    model = moelab.build_model(moelab.load_preset(preset), seed=0).to(device).train()
    opt = build_optimizer(model, TrainConfig())

    def step():
        out = model(ids, labels=ids, return_routing=True, capacity_factor=capacity_factor)
        (out.loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_selection_biases(out.routing)
    return step


def main() -> None:
    args = bc.parse_args(__doc__.splitlines()[0])
    bc.setup()
    bc.check_env()
    dev = args.device
    ids = torch.randint(0, 4096, (BATCH, SEQ), device=dev)
    steps = {"dense": stepper("tiny-dense", ids, dev), "moe": stepper("tiny-moe", ids, dev),
             "moe-dropless": stepper("tiny-moe", ids, dev, capacity_factor=None),
             "rmoe": stepper("tiny-rmoe", ids, dev)}
    t = bc.interleaved(steps, reps=max(args.reps, 15), device=dev)
    tok = BATCH * SEQ
    tps = {k: f"{tok / t.median(k):,.0f} tok/s" for k in t}
    extra = {"device": dev, "tokens_per_step": tok}
    rows = [
        t.row("train-step", f"tiny-moe vs tiny-dense, {BATCH}x{SEQ} tokens", "moe", "dense", "tiny-moe",
              "tiny-dense", note=f"{tps['moe']} vs {tps['dense']}", **extra),
        t.row("train-step", "tiny-rmoe vs tiny-moe", "rmoe", "moe", "tiny-rmoe", "tiny-moe", RMOE_TARGET,
              note=f"{tps['rmoe']} vs {tps['moe']}", **extra),
        t.row("train-step", "tiny-moe, capacity 1.25 (dropping) vs dropless", "moe", "moe-dropless",
              "dropping on", "dropping off", DROP_TARGET, note=f"{tps['moe']} vs {tps['moe-dropless']}",
              **extra),
    ]
    bc.emit(rows, args.json)


if __name__ == "__main__":
    main()
