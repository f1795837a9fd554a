"""Run logging: JSONL (always), TensorBoard (when installed), and a progress line on stderr."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A one-line progress bar with rate and time left; plain lines when stderr is not a terminal."""

    def __init__(self, total: int, label: str, unit: str = "tok", stream=None):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_print = 0.0

    def update(self, done: int, amount: float, extra: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last_print < (0.2 if self.tty else 10.0):
            return
        self.last_print = now
        elapsed = now - self.start
        rate = amount / max(elapsed, 1e-9)
        left = elapsed / max(done, 1) * (self.total - done)
        width = 24
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (f"{self.label} [{bar}] {done}/{self.total} {rate:,.0f} {self.unit}/s "
                f"elapsed {fmt_seconds(elapsed)} left {fmt_seconds(left)} {extra}")
        self.stream.write(("\r" + line.ljust(110)) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class RunLogger:
    def __init__(self, out_dir: Path, tensorboard: bool = True):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional: JSONL always has every number
                self.tb = None

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
