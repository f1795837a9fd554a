import argparse
import io

import pytest

from moelab.config import MoelabError
from moelab.data.commands import ProgressLine, register
from moelab.data.shards import load_corpus
from moelab.data.tokenizer import load_tokenizer


def parse(argv):
    parser = argparse.ArgumentParser(prog="moelab")
    register(parser.add_subparsers(dest="verb", required=True))
    return parser.parse_args(argv)


def test_data_build_and_info(tmp_path, capsys):
    out = tmp_path / "corpus"
    args = parse(["data", "build", "--out", str(out), "--source", "math:40", "--source", "python-docs",
                  "--vocab-size", "450", "--max-docs-per-source", "5", "--seed", "2"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert f"wrote corpus {out}: 10 documents" in captured.out
    assert "docs/s" in captured.err and "read: 10 docs" in captured.err
    corpus = load_corpus(out)
    assert corpus.info["build"]["seed"] == 2 and corpus.vocab_size == 450
    args = parse(["data", "info", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "10 documents" in printed and "math" in printed and "heldout" in printed


def test_data_build_reports_bad_sources(tmp_path):
    args = parse(["data", "build", "--out", str(tmp_path / "c"), "--source", "nonsense"])
    with pytest.raises(MoelabError, match="unknown source spec 'nonsense'"):
        args.func(args)


def test_tokenizer_train(tmp_path, capsys):
    path = tmp_path / "tok.json"
    args = parse(["tokenizer", "train", "--data-source", "python-docs", "--data-source", "math:50",
                  "--vocab-size", "420", "--kind", "unigram", "--out", str(path),
                  "--max-bytes-per-source", "20000"])
    assert args.func(args) == 0
    assert f"to {path}" in capsys.readouterr().out
    tok = load_tokenizer(path)
    assert tok.kind == "unigram" and tok.vocab_size == 420 and tok.eos_id == 1


def test_verbs_need_their_arguments():
    with pytest.raises(SystemExit):
        parse(["data", "build", "--out", "x"])  # no --source
    with pytest.raises(SystemExit):
        parse(["tokenizer", "train", "--data-source", "math", "--out", "t.json"])  # no --vocab-size


def test_progress_line_reports_rate_and_final_counts():
    stream = io.StringIO()
    progress = ProgressLine(stream, every_s=3600.0)  # throttled: a stage shows only its final counts
    progress("read", 1, 100)
    progress("read", 50, 5_000_000)
    progress("tokenize", 50, 5_000_000)
    progress.done()
    lines = stream.getvalue().split("\n")
    assert lines[0].startswith("\rread: 50 docs, 5.0 MB, ") and lines[0].endswith("docs/s ")
    assert lines[1].startswith("\rtokenize: 50 docs") and lines[2:] == [""]
    stream = io.StringIO()
    progress = ProgressLine(stream, every_s=0.0)  # unthrottled: every call shows
    progress("read", 1, 100)
    progress("read", 2, 200)
    assert stream.getvalue().count("\rread: ") == 2
