"""benchmarks/null_calibration.py runs end to end at a toy number of runs (the study itself is a benchmark)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "null_calibration.py"


def _bench():
    spec = importlib.util.spec_from_file_location("null_calibration", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_null_calibration_runs_and_writes_every_row(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "rows.json"
    assert bench.main(["--runs", "2", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    rows = got["rates"]
    assert len(rows) == 2 * sum(len(stats) for _, stats, _ in bench.SCENARIOS.values())
    assert {(r["scenario"], r["statistic"]) for r in got["excess"]} == {("past the pool, ID effect", "vocab"),
                                                                        ("past the pool, ID effect", "std")}
    assert all(r["sample"] > 0 and r["whole"] > 0 for r in got["excess"])
    assert all(0 <= r["ci_low"] <= r["rate"] <= r["ci_high"] <= 1 for r in rows)
    assert "| scenario |" in capsys.readouterr().out


def test_wilson_interval_by_hand():
    # p = 0.05, n = 200, z = 1.96: centre (0.05 + z^2/400) / (1 + z^2/200) = 0.058481, half-width
    # z sqrt(0.05 * 0.95 / 200 + z^2 / 160000) / (1 + z^2/200) = 0.031098 (worked by hand)
    lo, hi = _bench().wilson(10, 200)
    assert abs(lo - 0.027382) < 1e-5 and abs(hi - 0.089579) < 1e-5


def test_bad_runs_is_one_line(capsys):
    assert _bench().main(["--runs", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
