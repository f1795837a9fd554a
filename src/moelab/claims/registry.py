"""The rows, by name, in table order. A row is a function of the workspace returning its ClaimResult."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from moelab.claims.record import ClaimResult
from moelab.claims.workspace import Workspace
from moelab.config import MoelabError

# Modules holding rows, in table order; each registers its rows with @row when imported.
MODULES = ("rows_openmoe", "rows_turns", "rows_chatdrop", "rows_rmoe", "rows_depth", "rows_closer", "rows_denseref",
           "rows_olmoe", "rows_layers", "rows_upcycle", "rows_intervene")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    name: str
    paper: str
    fn: Callable[[Workspace], ClaimResult]


_ROWS: dict[str, RowSpec] = {}


def row(name: str, paper: str) -> Callable:
    def register(fn: Callable[[Workspace], ClaimResult]) -> Callable[[Workspace], ClaimResult]:
        if name in _ROWS and _ROWS[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"claims row {name!r} is registered twice")
        _ROWS[name] = RowSpec(name, paper, fn)
        return fn
    return register


def all_rows() -> dict[str, RowSpec]:
    for module in MODULES:
        try:
            importlib.import_module(f"moelab.claims.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"moelab.claims.{module}":
                raise
    return dict(_ROWS)


def select(names: list[str] | None) -> list[RowSpec]:
    rows = all_rows()
    if not names:
        return list(rows.values())
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise MoelabError(f"unknown claims row {unknown[0]!r} (rows: {', '.join(rows)})")
    return [rows[n] for n in names]


def run_row(spec: RowSpec, ws: Workspace) -> ClaimResult:
    import time

    t0 = time.perf_counter()
    result = spec.fn(ws)
    if result.row != spec.name or result.paper != spec.paper:
        raise ValueError(f"row {spec.name!r} returned a result for {result.row!r} ({result.paper})")
    result.seconds = time.perf_counter() - t0
    return result
