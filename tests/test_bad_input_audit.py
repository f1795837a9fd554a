"""Bad input from the README walkthrough audit (items 15, 16 and 18): one line on stderr naming the user's
own path or value (never an internal temporary name or raw errno text), exit status 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moelab.cli import main


@pytest.fixture
def dropless(tiny_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run / "run" / "checkpoints" / "step_000001", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"]["moe"].update(capacity_factor_train=None, capacity_factor_eval=None)  # exportable
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def _no_proc():
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, a file system nobody may write")


def test_convert_names_the_users_out_not_its_staging_folder(dropless, tmp_path, capsys, one_line):
    _no_proc()
    assert main(["convert", "--to-hf", str(dropless), "--out", "/proc/moelab-nope"]) == 2
    line = one_line("--out /proc/moelab-nope: /proc is not writable")
    assert ".partial" not in line
    assert main(["convert", "--to-hf", str(dropless), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", "/proc/moelab-nope"]) == 2
    one_line("--out /proc/moelab-nope: /proc is not writable")


def test_upcycle_refuses_an_unwritable_out_before_the_work(tiny_run, one_line):
    _no_proc()
    assert main(["upcycle", str(tiny_run / "run"), "--preset", str(tiny_run / "tiny.toml"),
                 "--out", "/proc/moelab-nope"]) == 2
    line = one_line("--out /proc/moelab-nope: /proc is not writable")
    assert "earlier checkpoints" not in line


def test_diff_creates_the_folders_of_its_out(tiny_trace, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "d.json"
    assert main(["diff", str(tiny_trace), str(tiny_trace), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) and sorted(p.name for p in out.parent.iterdir()) == ["d.json"]


@pytest.mark.parametrize("where, needle", [("proc", "--out /proc/moelab-nope: /proc is not writable"),
                                           ("file", "is a file, not a folder")])
def test_analyze_checks_its_out_before_analysing(tiny_trace, tmp_path, monkeypatch, where, needle, one_line):
    import moelab.report.build as build

    if where == "proc":
        _no_proc()
        out = "/proc/moelab-nope"
    else:
        out = str(tmp_path / "a_file")
        Path(out).write_text("x")
    monkeypatch.setattr(build, "build_report", lambda *a, **k: pytest.fail("the analysis ran"))
    assert main(["analyze", str(tiny_trace), "--out", out]) == 2
    line = one_line(needle)
    assert "Errno" not in line


@pytest.mark.parametrize("flags, needle", [
    (["--min-count", "-5"], "--min-count must be >= 1, got -5"),
    (["--min-count", "0"], "--min-count must be >= 1, got 0"),
    (["--labels", ""], "--labels '' names no label column"),
    (["--labels", " , "], "--labels ' , ' names no label column"),
    (["--names", ""], "--names '': a model name must not be empty"),
])
def test_analyze_flags_that_were_silently_accepted(tiny_trace, tmp_path, flags, needle, one_line):
    assert main(["analyze", str(tiny_trace), "--out", str(tmp_path / "r"), *flags]) == 2
    one_line(needle)
    assert not (tmp_path / "r").exists()


def test_probs_names_the_bad_value(tiny_run, tmp_path, one_line):
    assert main(["trace", str(tiny_run / "run"), "--data", str(tiny_run / "corpus"), "--probs", "top:abc",
                 "--out", str(tmp_path / "t.parquet")]) == 2
    one_line("argument --probs: 'top:abc' is not full, none or top:N")


@pytest.mark.parametrize("text, needle", [
    ("{not json", "is not valid JSON"),
    ("{}", "has schema_version=None: missing or not an integer"),
    ('{"schema_version": 99}', "has schema_version 99, newer than this moelab supports"),
])
def test_sidecar_errors_name_the_trace_and_its_sidecar(tiny_trace, tmp_path, text, needle, one_line):
    bad = tmp_path / "bad.parquet"
    shutil.copy(tiny_trace, bad)
    Path(f"{bad}.json").write_text(text)
    assert main(["analyze", str(bad), "--out", str(tmp_path / "r")]) == 2
    one_line(f"trace {bad}: its sidecar {bad}.json {needle}")


def test_data_info_on_a_file_says_it_is_not_a_corpus_folder(tiny_run, one_line):
    assert main(["data", "info", str(tiny_run / "corpus" / "tokens.npy")]) == 2
    one_line("tokens.npy is a file, not a corpus folder")


@pytest.mark.parametrize("arg, needle", [("/no/such/preset.toml", "preset file /no/such/preset.toml does not exist"),
                                         ("missing.toml", "preset file missing.toml does not exist"),
                                         ("nope", "unknown preset 'nope'")])
def test_params_says_a_preset_file_does_not_exist(arg, needle, one_line):
    assert main(["params", arg]) == 2
    one_line(needle)


@pytest.mark.parametrize("line, needle", [
    ('{"input_ids": [1]}', "line 1 is not an OLMoE routing line: it lacks the key(s) exp_ids (it has: input_ids)"),
    ("[1, 2]", "line 1 is not an OLMoE routing line: it holds a JSON array, not an object with the key(s) exp_ids"),
])
def test_olmoe_import_says_what_a_wrong_record_lacks(tmp_path, line, needle, one_line):
    src = tmp_path / "r.jsonl"
    src.write_text(line + "\n")
    assert main(["trace", "import", "olmoe", str(src), "--out", str(tmp_path / "t.parquet")]) == 2
    err = one_line(needle)
    assert "(needs" not in err
    assert not (tmp_path / "t.parquet").exists()


def test_ablate_refuses_an_expert_named_twice():
    from moelab.config import MoelabError
    from moelab.intervene.commands import parse_ablate

    assert parse_ablate(["1:0,2"], {1: 4}) == [(1, (0, 2))]
    with pytest.raises(MoelabError, match=r"--ablate '1:0,0': expert 0 is named twice"):
        parse_ablate(["1:0,0"], {1: 4})


def test_trace_refuses_an_existing_out_unless_overwrite(tiny_run, tmp_path, capsys, one_line):
    out = tmp_path / "t.parquet"
    argv = ["trace", str(tiny_run / "run"), "--data", str(tiny_run / "corpus"), "--tokens", "16", "--out", str(out)]
    assert main(argv) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main([*argv[:-2], "--tokens", "32", "--out", str(out)]) == 2
    one_line(f"--out {out} already exists: pass --overwrite to replace it")
    assert out.read_bytes() == before
    assert main([*argv[:-2], "--tokens", "32", "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != before


def test_trace_import_refuses_an_existing_out_unless_overwrite(tmp_path, one_line):
    import numpy as np

    src, out = tmp_path / "r.npy", tmp_path / "t.parquet"
    np.save(src, np.array([[[0, 1]], [[2, 3]]], np.int32))
    out.write_text("precious")
    assert main(["trace", "import", "replay", str(src), "--out", str(out)]) == 2
    one_line("already exists: pass --overwrite")
    assert out.read_text() == "precious"
    assert main(["trace", "import", "replay", str(src), "--out", str(out), "--overwrite"]) == 0


def test_a_transformers_folder_of_pickled_weights_is_refused_unopened(tiny_run, tmp_path, one_line):
    """Its pytorch_model.bin is never handed to torch.load, not even the restricted unpickler: one line says
    what to do, without torch's advice to retry with weights_only=False."""
    import torch

    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('pwned')",)

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(
        model_type="mixtral", vocab_size=512, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)))
    torch.save({"model.embed_tokens.weight": Payload()}, hf / "pytorch_model.bin")
    out = tmp_path / "t.parquet"
    assert main(["trace", "--hf", str(hf), "--data", str(tiny_run / "corpus"), "--tokens", "8",
                 "--out", str(out)]) == 2
    line = one_line("holds no .safetensors weights (found pytorch_model.bin: convert it to safetensors first)")
    assert "weights_only" not in line
    assert not marker.exists() and not out.exists()
