"""`moelab analyze`: a report and a short summary on success; one line on stderr and exit 2 on bad input."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from moelab import cli
from moelab.report.commands import register, short_summary

from .conftest import write_planted


@pytest.fixture
def main(monkeypatch):
    # Only this verb: the test does not depend on the other command modules (the lead lists it in cli.py).
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["moelab.report.commands"])
    return cli.main


@pytest.fixture
def trace(tmp_path):
    return write_planted(tmp_path / "t.parquet", all_experts=False, num_seqs=8)


def assert_one_line_error(capsys, rc, match):
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("moelab analyze: error: ")
    assert match in err and "Traceback" not in err


def test_analyze_writes_the_report_and_prints_a_summary(main, trace, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["analyze", str(trace), "--out", str(out), "--simulate-capacity", "2.0",
               "--simulate-batch-seqs", "4", "--labels", "domain", "--min-count", "10", "--names", "planted"])
    printed = capsys.readouterr().out.splitlines()
    assert rc == 0 and (out / "report.html").is_file()
    assert printed[0] == f"report:  {out / 'report.html'}" and printed[1] == f"metrics: {out / 'metrics.json'}"
    assert len(printed) == 7 and printed[2].startswith("  vocabulary specialisation")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["simulate"] == {"capacity_factor": 2.0, "batch_seqs": 4}
    assert metrics["labels"] == ["domain"] and metrics["models"]["planted"]["options"]["min_count"] == 10


def test_corrupt_trace_is_one_line_and_exit_2(main, trace, tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    data = bytearray(trace.read_bytes())
    chunk = next(c for c in (pq.ParquetFile(trace).metadata.row_group(0).column(j) for j in range(20))
                 if c.path_in_schema == "expert")  # a column every analysis reads
    at = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[at: at + 8] = b"\x07" * 8  # inside its data page; the footer survives, so open_trace passes
    bad.write_bytes(bytes(data))
    shutil.copy(f"{trace}.json", f"{bad}.json")
    rc = main(["analyze", str(bad), "--out", str(tmp_path / "out")])
    assert_one_line_error(capsys, rc, "unreadable")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    shutil.copy(f"{trace}.json", f"{garbage}.json")
    assert_one_line_error(capsys, main(["analyze", str(garbage), "--out", str(tmp_path / "out")]), "Parquet")
    assert not (tmp_path / "out").exists()


def test_schema_problems_are_one_line_and_exit_2(main, trace, tmp_path, capsys):
    table = pq.read_table(trace)
    missing = tmp_path / "missing.parquet"
    pq.write_table(table.drop_columns(["expert"]), missing)
    shutil.copy(f"{trace}.json", f"{missing}.json")
    assert_one_line_error(capsys, main(["analyze", str(missing), "--out", str(tmp_path / "o")]), "expert")
    empty = tmp_path / "empty.parquet"
    pq.write_table(table.slice(0, 0), empty)
    shutil.copy(f"{trace}.json", f"{empty}.json")
    assert_one_line_error(capsys, main(["analyze", str(empty), "--out", str(tmp_path / "o")]), "empty")
    newer = json.loads(open(f"{trace}.json").read())
    newer["schema_version"] = 99
    open(f"{trace}.json", "w").write(json.dumps(newer))
    assert_one_line_error(capsys, main(["analyze", str(trace), "--out", str(tmp_path / "o")]), "newer")
    assert not (tmp_path / "o").exists()


def test_flag_mistakes_are_one_line_and_exit_2(main, trace, tmp_path, capsys):
    other = write_planted(tmp_path / "other.parquet", step=2, num_seqs=8, all_experts=False,
                          config={"max_seq_len": 32, "moe": {"router": {"kind": "rmoe"}}})
    mine = write_planted(tmp_path / "mine.parquet", step=1, num_seqs=8, all_experts=False)
    out = str(tmp_path / "o")
    assert_one_line_error(capsys, main(["analyze", str(trace), "--out", out, "--early", str(mine), str(other)]),
                          "different models")
    assert_one_line_error(capsys, main(["analyze", str(trace), "--out", out, "--simulate-policy", "score"]),
                          "--simulate-capacity")
    assert_one_line_error(capsys, main(["analyze", str(trace), "--out", out, "--names", "a", "b"]), "--names")
    assert_one_line_error(capsys, main(["analyze", str(trace), "--out", out, "--labels", "colour"]), "colour")


def test_several_models_share_each_summary_line():
    def head(value, null):
        return {"label": "vocab", "value": value, "null": null, "text": "vocabulary specialisation ..."}

    metrics = {"summary": [], "models": {"a": {"headline": {"v": head(0.9, 0.2)}},
                                         "b": {"headline": {"v": head(0.5, 0.2)}}}}
    assert short_summary(metrics) == ["vocab: a 0.9, b 0.5 (null 0.2)"]
    metrics["models"]["b"]["headline"]["v"] = head(None, 0.3)
    assert short_summary(metrics) == ["vocab: a 0.9 (null 0.2), b n/a (null 0.3)"]


def test_register_adds_the_verb():
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    args = sub.choices["analyze"].parse_args(["a.parquet", "b.parquet", "--out", "o", "--early", "x", "y",
                                              "--early", "z", "w", "--weights", "c1", "c2"])
    assert args.traces == ["a.parquet", "b.parquet"] and args.early == [["x", "y"], ["z", "w"]]
    assert args.weights == ["c1", "c2"] and args.func.__name__ == "run_analyze"
