"""Bad input found by probing as a careless or hostile user (issue 11, items 7 and 8): each is one line
on stderr naming the problem, exit status 2, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moelab.cli import main


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.fixture
def copies(tiny_run, tmp_path):
    shutil.copytree(tiny_run / "corpus", tmp_path / "corpus")
    shutil.copytree(tiny_run / "run" / "checkpoints" / "step_000001", tmp_path / "ckpt")
    return tmp_path


@pytest.mark.parametrize("file, needle", [("tokens.npy", "cannot read"), ("docs.parquet", "cannot read"),
                                          ("corpus.json", "not valid JSON")])
def test_truncated_corpus_files(copies, file, needle, one_line):
    _truncate(copies / "corpus" / file)
    assert main(["eval", str(copies / "ckpt"), "--data", str(copies / "corpus"), "--tokens", "16"]) == 2
    one_line(needle)


@pytest.mark.parametrize("damage, needle", [
    (lambda c: _truncate(c / "optimizer.safetensors"), "cannot read"),
    (lambda c: (c / "rng.safetensors").unlink(), "rng.safetensors is missing"),
    (lambda c: _truncate(c / "rng.safetensors", 0.9), "cannot read"),
    (lambda c: (c / "state.json").write_text('{"step": "three"}'), "state.json is corrupt"),
])
def test_damaged_resume_state(tiny_run, copies, train_args, damage, needle, one_line):
    damage(copies / "ckpt")
    out = copies / "r"
    assert main(["train", "--preset", str(tiny_run / "tiny.toml"), "--data", str(copies / "corpus"), "--out",
                 str(out), "--resume", str(copies / "ckpt"), *train_args(steps=3)]) == 2
    one_line(needle)
    assert not out.exists()


@pytest.mark.parametrize("where", ["ckpt/config.json", "corpus/corpus.json"])
@pytest.mark.parametrize("value", [[1, 2], "text", 3])
def test_json_config_of_the_wrong_type(copies, where, value, one_line):
    (copies / where).write_text(json.dumps(value))
    assert main(["eval", str(copies / "ckpt"), "--data", str(copies / "corpus"), "--tokens", "16"]) == 2
    one_line("not a")


def test_convert_from_a_truncated_safetensors_file(copies, capsys, one_line):
    hf = copies / "hf"
    cfg = json.loads((copies / "ckpt" / "config.json").read_text())
    cfg["model"]["moe"].update(capacity_factor_train=None, capacity_factor_eval=None)  # exportable: dropless
    (copies / "ckpt" / "config.json").write_text(json.dumps(cfg))
    assert main(["convert", "--to-hf", str(copies / "ckpt"), "--out", str(hf)]) == 0
    capsys.readouterr()
    weights = sorted(hf.glob("*.safetensors"))[0]
    _truncate(weights, 0.7)
    assert main(["convert", "--from-hf", str(hf), "--out", str(copies / "back")]) == 2
    one_line("not a complete safetensors file")
    assert not (copies / "back").exists()


def _out_cases(tiny_run, blocker: Path):
    data = ["--data", str(tiny_run / "corpus")]
    return {
        "trace": ["trace", str(tiny_run / "run"), *data, "--tokens", "16", "--out", str(blocker / "t.parquet")],
        "train": ["train", "--preset", str(tiny_run / "tiny.toml"), *data, "--out", str(blocker / "run"),
                  "--steps", "1"],
        "data build": ["data", "build", "--out", str(blocker / "c"), "--source", "math:20", "--vocab-size", "400"],
        "tokenizer train": ["tokenizer", "train", "--data-source", "math:20", "--vocab-size", "400",
                            "--out", str(blocker / "tok.json")],
    }


@pytest.mark.parametrize("verb", ["trace", "train", "data build", "tokenizer train"])
def test_out_under_a_regular_file(tiny_run, tmp_path, verb, one_line):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(_out_cases(tiny_run, blocker)[verb]) == 2
    one_line("is a file, not a folder")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("verb", ["trace", "train", "data build", "tokenizer train"])
def test_out_in_an_unwritable_place(tiny_run, tmp_path, verb, one_line):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, a file system nobody may write")
    assert main(_out_cases(tiny_run, Path("/proc/moelab-nope"))[verb]) == 2
    one_line("/proc is not writable")


def test_trace_out_an_existing_folder_writes_nothing(tiny_run, tmp_path, one_line):
    out = tmp_path / "x"
    out.mkdir()
    assert main(["trace", str(tiny_run / "run"), "--data", str(tiny_run / "corpus"), "--tokens", "16",
                 "--out", str(out)]) == 2
    one_line("is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"] and not any(out.iterdir())


@pytest.mark.parametrize("flags, needle", [
    (["--top-k", "0"], "--top-k 0 must be >= 1"), (["--top-k", "-4"], "--top-k -4 must be >= 1"),
    (["--temperature", "nan"], "--temperature nan must be"), (["--temperature", "-1"], "--temperature -1.0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens: -3 must be >= 1"),
])
def test_generate_arguments(tiny_run, flags, needle, one_line):
    assert main(["generate", str(tiny_run / "run"), "--prompt", "def", *flags]) == 2
    one_line(needle)


@pytest.mark.parametrize("argv, needle", [
    (["eval", "RUN", "--data", "CORPUS", "--tokens", "0"], "--tokens: 0 must be >= 1"),
    (["eval", "RUN", "--data", "CORPUS", "--seq-len", "0"], "--seq-len: 0 must be >= 1"),
    (["trace", "RUN", "--data", "CORPUS", "--seq-len", "0", "--out", "OUT/t.parquet"], "--seq-len: 0 must be"),
    (["trace", "RUN", "--data", "CORPUS", "--batch-size", "0", "--out", "OUT/t.parquet"], "--batch-size: 0"),
    (["analyze", "T.parquet", "--out", "OUT/r", "--simulate-capacity", "1", "--simulate-group-size", "0"],
     "--simulate-group-size: 0 must be >= 1"),
    (["analyze", "T.parquet", "--out", "OUT/r", "--simulate-capacity", "inf"], "--simulate-capacity inf"),
    (["train", "--preset", "TINY", "--data", "CORPUS", "--out", "OUT/r", "--set",
      "model.moe.capacity_factor_train=inf"], "capacity_factor_train=inf should be a finite number"),
    (["train", "--preset", "TINY", "--data", "CORPUS", "--out", "OUT/r", "--set", "train.lr=inf"],
     "train.lr=inf should be a finite number"),
    (["train", "--preset", "TINY", "--data", "CORPUS", "--out", "OUT/r", "--set", "parallel.ep=3",
      "--set", "data.batch_size=6"], "parallel.ep=3 must divide the expert count"),
])
def test_silent_acceptance_is_refused(tiny_run, tmp_path, argv, needle, one_line):
    subst = {"RUN": str(tiny_run / "run"), "CORPUS": str(tiny_run / "corpus"), "TINY": str(tiny_run / "tiny.toml"),
             "OUT": str(tmp_path / "o"), "T.parquet": str(tmp_path / "t.parquet")}
    argv = [subst.get(a, a).replace("OUT", str(tmp_path / "o")) for a in argv]
    assert main(argv) == 2
    one_line(needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("verb", ["eval", "generate"])
def test_eval_and_generate_run_on_the_device_named(tiny_run, verb, capsys, one_line):
    """--device: cpu (the default) and auto give the same output here; a device this machine lacks, or no
    device at all, is one line before any model loads."""
    import torch

    args = ([verb, str(tiny_run / "run")]
            + (["--data", str(tiny_run / "corpus"), "--tokens", "64"] if verb == "eval"
               else ["--prompt", "def", "--max-new-tokens", "4", "--temperature", "0"]))
    capsys.readouterr()
    outs = []
    for device in ([], ["--device", "cpu"], ["--device", "auto"]):
        assert main(args + device) == 0
        outs.append(capsys.readouterr().out)
    if not torch.cuda.is_available():
        assert outs[0] == outs[1] == outs[2]
        assert main(args + ["--device", "cuda"]) == 2
        one_line("--device 'cuda' but CUDA is not available here")
    assert main(args + ["--device", "gpu0"]) == 2
    one_line("--device 'gpu0' is unknown")
