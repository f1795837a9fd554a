"""The runner end to end at toy scale: trains, measures, writes a result and a table; bad input is one line."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def runner():
    spec = importlib.util.spec_from_file_location("claims_runner", ROOT / "benchmarks" / "claims.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    assert d["seeds"] == 2 and d["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    assert len(d["details"]["per_seed"]) == 2
    assert "openmoe-moe-beats-dense" in (tmp_path / "CLAIMS.md").read_text()
    assert (tmp_path / "cache" / "runs" / "tiny-moe-s1" / "claims-settings.json").is_file()


def test_unknown_row_is_one_line(capsys):
    assert runner().main(["--only", "no-such-row", "--list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown claims row 'no-such-row'" in err[0]
