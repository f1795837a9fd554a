"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from moelab.config import ConfigError
from moelab.train.config import TrainConfig
from moelab.train.step_options import fused_adamw_ok


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only, or Adafactor (OpenMoE's)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        # Fused (one kernel) on CUDA only; torch's default elsewhere (step_options.fused_adamw_ok).
        fused = True if fused_adamw_ok(params) else None
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if not hasattr(torch.optim, "Adafactor"):
        raise ConfigError("train.optimizer=adafactor needs torch >= 2.5")
    return torch.optim.Adafactor(groups, lr=cfg.lr)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for a 0-based optimiser step."""
    s = step + 1
    warm = cfg.warmup_steps
    if cfg.schedule == "inverse_sqrt":
        # OpenMoE: 1/sqrt(max(step, floor)); scaled so that the plateau before `floor` equals lr.
        base = cfg.lr * math.sqrt(cfg.inverse_sqrt_floor) / math.sqrt(max(s, cfg.inverse_sqrt_floor))
        return base * min(1.0, s / warm) if warm else base
    if warm and s <= warm:
        return cfg.lr * s / warm
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (s - warm) / max(1, cfg.steps - warm))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
