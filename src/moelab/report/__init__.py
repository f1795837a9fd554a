"""Analysis results -> figures -> one self-contained HTML report (`report.html`) beside `metrics.json`.

- `build_report(traces, out_dir, ...)`: analyse traces (and checkpoints) and write the report.
- `write_report(out_dir, sections, ...)`: the page writer, for sections built by hand.
- `figures`: one function per figure, each taking plain analysis results and returning a `Figure`.

The names are loaded on first use so that `moelab --help` (which imports `report.commands`) stays fast.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"build_report": "moelab.report.build", "write_report": "moelab.report.html",
            "Section": "moelab.report.html", "FigureBlock": "moelab.report.html", "Table": "moelab.report.html",
            "Note": "moelab.report.html"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moelab.report' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
