"""TrainConfig and the RunConfig that composes model, data and training settings."""

from __future__ import annotations

import dataclasses
from typing import Literal

from moelab.config import Config, check_seed, require
from moelab.data.config import DataConfig
from moelab.model.config import ModelConfig


@dataclasses.dataclass(kw_only=True)
class TrainConfig(Config):
    steps: int = 200
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    schedule: Literal["cosine", "inverse_sqrt", "constant"] = "cosine"
    warmup_steps: int = 20
    inverse_sqrt_floor: int = 10000  # OpenMoE: lr ~ 1/sqrt(max(step, floor)), scaled so the peak is lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # bf16 autocast where the device supports it
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    eval_tokens: int = 16384  # held-out tokens per domain
    save_every: int = 0  # 0: only the final checkpoint; N keeps every N-th step
    tensorboard: bool = True
    freeze_router_after: int | None = None  # OpenMoE's remedy: stop training routers after this step
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default
    # Step speed (train/precision.py, train/step_options.py). bf16: bf16 parameters under bf16 autocast,
    # fp32 masters in the optimizer and in checkpoints.
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute each block's activations in the backward
    # Mid-run switch: [{start, objective, weights}, ...] tables (train/phases.py); empty: one phase, the
    # data config's objective and the corpus's own mix.
    phases: list[dict] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        require(self.steps >= 1, f"train.steps={self.steps} must be >= 1")
        require(self.lr > 0, f"train.lr={self.lr} must be > 0")
        require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        require(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        require(self.grad_accum >= 1, f"train.grad_accum={self.grad_accum} must be >= 1")
        require(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0")
        require(self.log_every >= 1, f"train.log_every={self.log_every} must be >= 1")
        require(self.save_every >= 0 and self.eval_every >= 0, "train.save_every and train.eval_every must be >= 0")
        require(self.inverse_sqrt_floor >= 1, f"train.inverse_sqrt_floor={self.inverse_sqrt_floor} must be >= 1")
        check_seed(self.seed, "train.seed")
        require(self.threads >= 0, f"train.threads={self.threads} must be >= 0 (0 leaves torch's default)")
        from moelab.train.phases import parse_phases

        parse_phases(self.phases)
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
                f"train.device={self.device!r} is unknown (allowed: auto, cpu, cuda, cuda:N, mps)")


@dataclasses.dataclass(kw_only=True)
class ParallelConfig(Config):
    """The process mesh under torchrun: dp x ep must equal the number of processes launched."""

    dp: int = 1  # data-parallel degree: ranks holding the same experts, each on its own rows
    ep: int = 1  # expert-parallel degree: ranks splitting each MoE layer's experts
    dp_mode: Literal["ddp", "fsdp"] = "ddp"  # wrapper when ep == 1 (with ep > 1 gradients sync by hand)
    timeout_s: float = 300.0  # a collective waiting longer than this fails instead of hanging
    # world: the balance loss counts f over every rank's tokens, so a step matches one process on the
    # global batch (Megatron's global aux loss); rank: each rank's own loss (distributed/balance.py)
    balance_reduce: Literal["world", "rank"] = "world"

    def validate(self) -> None:
        require(self.dp >= 1, f"parallel.dp={self.dp} must be >= 1")
        require(self.ep >= 1, f"parallel.ep={self.ep} must be >= 1")
        require(self.timeout_s > 0, f"parallel.timeout_s={self.timeout_s} must be > 0")


@dataclasses.dataclass(kw_only=True)
class RunConfig(Config):
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)

    def validate(self) -> None:
        world = self.parallel.dp * self.parallel.ep
        require(self.data.batch_size % world == 0,
                f"data.batch_size={self.data.batch_size} must be divisible by parallel.dp x parallel.ep "
                f"= {world} (each rank takes an equal share of every batch)")
        counts = self.model.experts_per_layer()
        on = [k for k, v in (("param_dtype=bf16", self.train.param_dtype == "bf16"),
                             ("compile=true", self.train.compile),
                             ("activation_checkpointing=true", self.train.activation_checkpointing)) if v]
        require(world == 1 or not on, f"train.{on[0] if on else ''} runs in one process only (the parallel "
                                      f"mesh's wrappers and optimizer sharding do not handle it yet); "
                                      f"parallel.dp x parallel.ep = {world}")
        bad = [e for e in counts if e % self.parallel.ep]
        require(not bad, f"parallel.ep={self.parallel.ep} must divide the expert count of every MoE layer "
                         f"(model.moe.num_experts={bad[0] if bad else 0})")
