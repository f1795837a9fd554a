"""DataConfig: which corpus a run reads and how it is cut into batches."""

from __future__ import annotations

import dataclasses
from typing import Literal

from moelab.config import Config, require


@dataclasses.dataclass(kw_only=True)
class DataConfig(Config):
    path: str = ""  # a corpus folder written by `moelab data build`
    seq_len: int = 512
    batch_size: int = 8  # sequences per step (per process)
    objective: Literal["causal", "ul2"] = "causal"
    seed: int = 0  # batches are a function of (seed, step)
    eval_split: Literal["heldout", "train"] = "heldout"  # the split evaluation and tracing read
    # A second corpus mixed into the first `mix_steps` steps, each row drawn from it with
    # probability `mix_fraction` (e.g. a little code or math early in training).
    mix_path: str = ""
    mix_steps: int = 0
    mix_fraction: float = 0.0

    def validate(self) -> None:
        require(self.seq_len >= 2, f"data.seq_len={self.seq_len} must be at least 2")
        require(self.batch_size >= 1, f"data.batch_size={self.batch_size} must be at least 1")
        require(self.objective in ("causal", "ul2"),
                f"data.objective={self.objective!r} is not one of 'causal', 'ul2'")
        require(self.seed >= 0, f"data.seed={self.seed} must be >= 0")
        require(self.eval_split in ("heldout", "train"),
                f"data.eval_split={self.eval_split!r} is not one of 'heldout', 'train'")
        require(self.mix_steps >= 0, f"data.mix_steps={self.mix_steps} must be >= 0")
        require(0.0 <= self.mix_fraction <= 1.0, f"data.mix_fraction={self.mix_fraction} must be in [0, 1]")
        if self.mix_steps > 0:
            require(bool(self.mix_path), f"data.mix_path must be set when mix_steps={self.mix_steps} > 0")
            require(self.mix_fraction > 0, f"data.mix_fraction must be > 0 when mix_steps={self.mix_steps} > 0")
        elif self.mix_path:
            require(False, f"data.mix_steps must be > 0 when mix_path={self.mix_path!r} is set")
