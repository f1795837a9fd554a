"""Training phases: OpenMoE changed objective and data mix mid-run (UL2 then causal LM; code 52% then 15%).

`train.phases` is a list of tables, each `{start = STEP, objective = "causal" | "ul2", weights = {DOMAIN =
W, ...}}`; a phase runs from its start to the next phase's (the first starts at 0). Empty weights keep the
corpus's own mix. Each phase's batches stay a pure function of (seed, step), so a run resumed at any
step, a phase boundary included, sees the batches it would have seen: resuming is bit for bit.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Literal

from moelab.config import Config, ConfigError, require
from moelab.data.objectives import build_sampler


@dataclasses.dataclass(kw_only=True)
class Phase(Config):
    start: int = 0
    objective: Literal["causal", "ul2"] = "causal"
    weights: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        require(self.start >= 0, f"start={self.start} must be >= 0")
        for name, w in self.weights.items():
            require(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0,
                    f"weights.{name}={w!r} must be a finite number >= 0")
        require(not self.weights or sum(self.weights.values()) > 0, "weights must not all be zero")


def parse_phases(raw: list) -> list[Phase]:
    """The phases of `train.phases`, checked: tables, the first at step 0, starts increasing."""
    phases = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"train.phases[{i}]={item!r} should be a table (start, objective, weights)")
        try:
            phases.append(Phase.from_dict(item, path=f"train.phases[{i}]"))
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith("train.phases") else f"train.phases[{i}].{msg}") from None
    starts = [p.start for p in phases]
    if phases and starts[0] != 0:
        raise ConfigError(f"train.phases[0].start={starts[0]} must be 0 (the first phase starts the run)")
    bad = [i for i in range(1, len(starts)) if starts[i] <= starts[i - 1]]
    if bad:
        raise ConfigError(f"train.phases[{bad[0]}].start={starts[bad[0]]} must be after the previous phase's "
                          f"start ({starts[bad[0] - 1]})")
    return phases


class PhasedSampler:
    """One sampler per phase; step s reads the phase whose range holds s."""

    def __init__(self, data_cfg, phases: list[Phase], split: str = "train"):
        self.starts = [p.start for p in phases]
        self.phases = phases
        self.samplers = [build_sampler(data_cfg, split=split, objective=p.objective, weights=p.weights or None)
                         for p in phases]

    def index(self, step: int) -> int:
        return bisect.bisect_right(self.starts, step) - 1

    def batch(self, step: int):
        return self.samplers[self.index(step)].batch(step)


def build_train_sampler(data_cfg, raw_phases: list):
    """The run's training sampler: phased when `train.phases` is set, else the data config's own."""
    phases = parse_phases(raw_phases)
    return PhasedSampler(data_cfg, phases) if phases else build_sampler(data_cfg, split="train")
