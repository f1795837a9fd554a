"""The runner end to end at toy scale: trains, measures, writes a result and a table; bad input is one line."""

import dataclasses
import json
from pathlib import Path

from runner_loader import runner

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_row_writes_result_and_table(tmp_path, monkeypatch, capsys):
    import tempfile

    import torch

    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix="": str(tmp_path))
    threads = torch.get_num_threads()
    try:  # one thread: on a loaded 2-core machine a second torch thread mostly spins
        assert runner().main(["--smoke", "--threads", "1", "--only", "openmoe-moe-beats-dense"]) == 0
    finally:
        torch.set_num_threads(threads)
    d = json.loads((tmp_path / "results" / "openmoe-moe-beats-dense.json").read_text())
    assert d["seeds"] == 2 and d["verdict"] == "too few seeds"  # smoke trains 2 seeds
    assert len(d["details"]["per_seed"]) == 2
    assert "training-loss gap" in d["precondition"]["needs"]  # 6 steps: too few in the window to fit a slope
    assert d["precondition"]["measured"] == "too few logged steps to fit a slope" and not d["precondition"]["met"]
    assert "openmoe-moe-beats-dense" in (tmp_path / "CLAIMS.md").read_text()
    printed = capsys.readouterr()
    said = (printed.out + printed.err).lower()  # 6 steps decide nothing: no verdict word is printed
    assert "no verdict" in said and not any(w in said for w in ("reproduced", "inconclusive", "too few seeds",
                                                                 "not testable"))
    assert (tmp_path / "cache" / "runs" / "tiny-moe-s1" / "claims-settings.json").is_file()


def test_unknown_row_is_one_line(capsys):
    assert runner().main(["--only", "no-such-row", "--list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown claims row 'no-such-row'" in err[0]


def _docs_state():
    docs = ROOT / "docs"
    return {p: p.read_bytes() for p in [docs / "CLAIMS.md", *sorted((docs / "claims").glob("*.json"))]}


def test_rerun_without_write_docs_leaves_docs_untouched(tmp_path, monkeypatch):
    mod = runner()
    from moelab.claims.record import read_results

    committed = read_results(ROOT / "docs" / "claims")["openmoe-moe-beats-dense"]
    from moelab.claims.verdict import Precondition

    fake = dataclasses.replace(committed, seed_values=[0.5, 0.6, 0.7], details={}, previous_verdict="",
                               precondition=Precondition("a settled gap", "moved +0.001", True))
    monkeypatch.setattr(mod, "run_row", lambda spec, ws: fake)  # a different machine's numbers for the row
    monkeypatch.chdir(tmp_path)
    before = _docs_state()
    assert mod.main(["--only", "openmoe-moe-beats-dense", "--cache", str(tmp_path / "cache")]) == 0
    assert mod.main(["--table-only"]) == 0
    assert _docs_state() == before
    out = json.loads((tmp_path / "claims-scratch" / "results" / "openmoe-moe-beats-dense.json").read_text())
    assert out["seed_values"] == [0.5, 0.6, 0.7] and out["verdict"] == "reproduced"
    assert (tmp_path / "claims-scratch" / "CLAIMS.md").is_file()
    assert mod.main(["--smoke", "--write-docs", "--only", "openmoe-moe-beats-dense"]) == 2
