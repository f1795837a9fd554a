"""`MOELAB_CPU_EXPERTS`, the pinned CPU kernel for fp32 expert inference, read and checked without torch,
so `moelab` can refuse a bad value at start-up (before a run folder or a demo's minutes of work)."""

from __future__ import annotations

import os

from moelab.config import MoelabError

CPU_EXPERTS_ENV = "MOELAB_CPU_EXPERTS"  # auto (measured), onednn or matmul: CPU fp32 inference's kernel
CPU_EXPERTS_CHOICES = ("auto", "onednn", "matmul")


def cpu_experts_mode() -> str:
    """The environment's choice, one of `CPU_EXPERTS_CHOICES` (unset or empty: `auto`); any other value
    is a `MoelabError` naming it."""
    mode = os.environ.get(CPU_EXPERTS_ENV, "auto").strip().lower() or "auto"
    if mode not in CPU_EXPERTS_CHOICES:
        raise MoelabError(f"{CPU_EXPERTS_ENV}={mode!r} is not one of {', '.join(CPU_EXPERTS_CHOICES)}")
    return mode
