"""One row's result as JSON: what the paper says, what moelab measured, the verdict and how to re-run it.

The verdict is recomputed from the stored per-seed values, measure, claim and precondition when a result
is read, so a table can never show a verdict its numbers do not support. With two or more per-seed values
the measure's interval is the t-interval over them (`seeds.t_interval`): the row's own interval (often a
bootstrap over held-out sequences) is kept in details as `sequence_level_measure`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from moelab.claims.preconditions import superseded, unmeasured
from moelab.claims.seeds import t_interval
from moelab.claims.seedvals import seed_values
from moelab.claims.verdict import MIN_SEEDS, Claim, Measure, Precondition, decide
from moelab.config import MoelabError

SCHEMA = 1


@dataclasses.dataclass
class ClaimResult:
    row: str  # the runner's name for the row, also the file name
    paper: str  # OpenMoE, RMoE, A Closer Look, OLMoE, Sparse upcycling, Interventions
    claim: str  # the paper's statement in our words
    paper_number: str  # what the paper reports (a number where it gives one)
    measured: str  # what moelab computes, as a caption: the statistic, the null and the interval
    measure: Measure
    test: Claim
    setup: str  # models, steps, tokens, seeds
    seeds: int = 1
    unit: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # per-layer, per-seed numbers
    note: str = ""  # why the verdict, at this scale
    seconds: float = float("nan")  # wall time of the row, cached models excluded
    command: str = ""
    seed_values: list[float] = dataclasses.field(default_factory=list)  # the statistic per trained model
    precondition: Precondition | None = None  # the regime the claim needs, measured
    previous_verdict: str = ""  # the verdict stored in the JSON this result was read from (old rule)
    verdict: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        self.precondition = unmeasured(self.row) if self.precondition is None else superseded(self.precondition)
        if not self.seed_values:
            self.seed_values = seed_values(self.row, self.details, self.seeds, self.measure.value)
        finite = [v for v in self.seed_values if math.isfinite(v)]
        if len(finite) >= 2:
            own = self.details.get("sequence_level_measure") or dataclasses.asdict(self.measure)
            self.details["sequence_level_measure"] = own
            mean, lo, hi = t_interval(finite)
            self.measure = Measure(mean, lo, hi, self.measure.null, self.measure.null_sd)
        elif len(finite) == 1 and self.seeds > 1:  # one seed's value of several: no interval over seeds
            self.measure = Measure(finite[0], float("nan"), float("nan"), self.measure.null, self.measure.null_sd)
        self.verdict, self.reason = decide(self.measure, self.test, len(finite), self.precondition)
        if self.verdict == "too few seeds" and 0 < len(finite) < self.seeds:
            self.reason = (f"the row's statistic is stored for {len(finite)} of the {self.seeds} seeds; an interval "
                           f"over seeds needs at least {MIN_SEEDS}")
        if not self.command:
            self.command = f"python benchmarks/claims.py --only {self.row}"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["schema"] = SCHEMA
        return _finite_or_none(d)


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def from_json(d: dict[str, Any], where: str = "result") -> ClaimResult:
    try:
        if d.get("schema") != SCHEMA:
            raise MoelabError(f"{where}: schema {d.get('schema')!r}, expected {SCHEMA}")
        m = d["measure"]
        measure = Measure(_num(m["value"]), _num(m["ci_low"]), _num(m["ci_high"]), _num(m["null"]),
                          None if m.get("null_sd") is None else float(m["null_sd"]))
        fields = {f.name for f in dataclasses.fields(ClaimResult)} - {
            "measure", "test", "verdict", "reason", "precondition", "previous_verdict"}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["seconds"] = _num(kw.get("seconds"))
        kw["seed_values"] = [_num(v) for v in kw.get("seed_values") or []]
        pre = d.get("precondition")
        return ClaimResult(measure=measure, test=Claim(**d["test"]), precondition=None if pre is None else
                           Precondition(str(pre["needs"]), str(pre["measured"]), bool(pre["met"])),
                           previous_verdict=str(d.get("previous_verdict") or d.get("verdict") or ""), **kw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MoelabError(f"{where} is not a claims result ({type(e).__name__}: {e})") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file beside `path`: a failure leaves the previous file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_result(result: ClaimResult, folder: str | Path) -> Path:
    """Write atomically: a row that fails half-way leaves the previous result in place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result.row}.json"
    write_text_atomic(path, json.dumps(result.to_json(), indent=1, allow_nan=False) + "\n")
    return path


def read_results(folder: str | Path) -> dict[str, ClaimResult]:
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoelabError(f"{path} is not readable JSON ({e})") from None
        if not isinstance(d, dict):
            raise MoelabError(f"{path} is not a claims result (a JSON object)")
        r = from_json(d, str(path))
        out[r.row] = r
    return out
