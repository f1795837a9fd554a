"""A corpus built with --heldout-fraction 0: `eval` of its held-out split refuses in one line (it printed an
empty table and {}, exit 0); `train` on it works but says once that there is nothing to evaluate."""

from __future__ import annotations

import json

import pytest

from moelab.cli import main


@pytest.fixture(scope="module")
def no_heldout(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("noheld") / "c"
    assert main(["data", "build", "--out", str(out), "--source", "math:50", "--tokenizer",
                 str(tiny_run / "corpus" / "tokenizer.json"), "--heldout-fraction", "0"]) == 0
    return out


def test_eval_of_an_empty_heldout_split_is_refused(tiny_run, no_heldout, capsys):
    capsys.readouterr()
    assert main(["eval", str(tiny_run / "run"), "--data", str(no_heldout), "--tokens", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moelab eval: error: corpus {no_heldout} has no documents in split 'heldout' "
                   "(built with --heldout-fraction 0?)"]
    assert main(["eval", str(tiny_run / "run"), "--data", str(no_heldout), "--tokens", "16",
                 "--split", "train"]) == 0


def test_train_without_heldout_text_warns_once(tiny_run, no_heldout, tmp_path, capsys, train_args):
    capsys.readouterr()
    assert main(["train", "--preset", str(tiny_run / "tiny.toml"), "--data", str(no_heldout),
                 "--out", str(tmp_path / "r"), *train_args(steps=1)]) == 0
    err = capsys.readouterr().err
    assert err.count("has no documents in split 'heldout'") == 1 and "eval.json will be empty" in err
    assert json.loads((tmp_path / "r" / "eval.json").read_text()) == {}
