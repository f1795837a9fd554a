"""Fuzz: randomly corrupted corpora, checkpoints, presets and Hugging Face folders, fed to every verb that
reads them, in process through `moelab.cli.main`.

Each case copies one input, damages one of its files (truncation, flipped bytes, or a JSON/TOML value
replaced by one of another type) and runs one reader verb on it. A verb may succeed (a flipped byte
inside a weight is a valid file with another number in it), but otherwise it must exit 2 with exactly
one error line, raise nothing, and leave no half-written output: no trace, no converted folder, no
`.tmp` / `.partial` staging left behind. Truncations and type changes of required values must fail.
Traces are not fuzzed here: their reader (`trace/io.py`) validates them and has its own tests.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from moelab.cli import main

CASES = 200
CORPUS_FILES = ["tokens.npy", "docs.parquet", "corpus.json", "tokenizer.json"]
CKPT_FILES = ["model.safetensors", "config.json", "state.json", "optimizer.safetensors", "rng.safetensors"]
HF_FILES = ["config.json", "model.safetensors"]


def truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    path.write_bytes(data[:rng.randrange(len(data))])
    return "truncate"


def flip(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    path.write_bytes(bytes(data))
    return "flip"


OTHER_TYPES = [[1, 2], "text", -3, 2.5, None, {"a": 1}, True]
TOML_VALUES = ["[1, 2]", '"text"', "-3", "{a = 1}", "true", "2.5"]


def retype(path: Path, rng: random.Random) -> str:
    """Replace one value of a JSON (or a TOML preset) file by one of another type."""
    if path.suffix == ".toml":
        lines = path.read_text().splitlines()
        idx = rng.choice([i for i, line in enumerate(lines) if "=" in line])
        key = lines[idx].split("=")[0]
        lines[idx] = key + "= " + rng.choice(TOML_VALUES)
        path.write_text("\n".join(lines))
        return "retype"
    doc = json.loads(path.read_text())
    node, keys = doc, []
    while isinstance(node, dict) and node and (not keys or rng.random() < 0.6):
        keys.append(rng.choice(sorted(node)))
        parent, node = node, node[keys[-1]]
    new = rng.choice([v for v in OTHER_TYPES if type(v) is not type(node)])
    if keys:
        parent[keys[-1]] = new
    else:
        doc = new
    path.write_text(json.dumps(doc))
    return "retype"


@pytest.fixture(scope="module")
def inputs(tiny_run, tmp_path_factory):
    """The originals: corpus, a mid-run checkpoint (resumable), a dropless one exported to transformers."""
    d = tmp_path_factory.mktemp("fuzz_inputs")
    dropless = d / "dropless"
    shutil.copytree(tiny_run / "run" / "checkpoints" / "step_000001", dropless)
    cfg = json.loads((dropless / "config.json").read_text())
    cfg["model"]["moe"].update(capacity_factor_train=None, capacity_factor_eval=None)
    (dropless / "config.json").write_text(json.dumps(cfg))
    assert main(["convert", "--to-hf", str(dropless), "--out", str(d / "hf")]) == 0
    return {"corpus": tiny_run / "corpus", "ckpt": tiny_run / "run" / "checkpoints" / "step_000001",
            "hf": d / "hf", "preset": tiny_run / "tiny.toml", "run": tiny_run / "run"}


def verbs_for(kind: str, target: Path, inp: dict, out: Path, train_args) -> dict[str, list[str]]:
    """The verbs that can read a damaged copy `target` of input `kind`, writing under `out`."""
    corpus, ckpt = str(inp["corpus"]), str(inp["ckpt"])
    preset = ["--preset", str(inp["preset"])]
    if kind == "corpus":
        data = ["--data", str(target)]
        return {"eval": ["eval", ckpt, *data, "--tokens", "16"], "info": ["data", "info", str(target)],
                "trace": ["trace", ckpt, *data, "--tokens", "16", "--out", str(out / "t.parquet")],
                "generate": ["generate", ckpt, "--prompt", "x", "--max-new-tokens", "2", "--tokenizer",
                             str(target / "tokenizer.json")],
                "train": ["train", *preset, *data, "--out", str(out / "run"), *train_args(steps=1)]}
    if kind == "ckpt":
        return {"eval": ["eval", str(target), "--data", corpus, "--tokens", "16"],
                "trace": ["trace", str(target), "--data", corpus, "--tokens", "16", "--out", str(out / "t.parquet")],
                "generate": ["generate", str(target), "--prompt", "x", "--max-new-tokens", "2"],
                "convert": ["convert", "--to-hf", str(target), "--out", str(out / "hf")],
                "resume": ["train", *preset, "--data", corpus, "--out", str(out / "run"), "--resume", str(target),
                           *train_args(steps=2)]}
    if kind == "hf":
        return {"convert": ["convert", "--from-hf", str(target), "--out", str(out / "conv")]}
    return {"params": ["params", str(target)],
            "train": ["train", "--preset", str(target), "--data", corpus, "--out", str(out / "run"),
                      *train_args(steps=1)]}



READERS = {  # which verbs read each file (a verb that does not read it would rightly succeed)
    "tokens.npy": ("eval", "info", "trace", "train"), "docs.parquet": ("eval", "info", "trace", "train"),
    "corpus.json": ("eval", "info", "trace", "train"), "tokenizer.json": ("generate",),
    "model.safetensors": ("eval", "trace", "generate", "convert", "resume"),
    "config.json": ("eval", "trace", "generate", "convert", "resume"), "state.json": ("trace", "resume"),
    "optimizer.safetensors": ("resume",), "rng.safetensors": ("resume",), "tiny.toml": ("params", "train"),
}


def plan(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.choice(["corpus", "corpus", "ckpt", "ckpt", "hf", "preset"])
    files = {"corpus": CORPUS_FILES, "ckpt": CKPT_FILES, "hf": HF_FILES, "preset": ["tiny.toml"]}[kind]
    name = rng.choice(files)
    how = ["truncate", "flip"] + (["retype"] * 2 if name.endswith((".json", ".toml")) else [])
    return kind, name, rng.choice(how)


def test_corrupted_inputs_give_one_line_and_exit_2(inputs, tmp_path, capsys, train_args):
    rng = random.Random(11)
    outcomes = {0: 0, 2: 0}
    for case in range(CASES):
        kind, name, how = plan(rng)
        work = tmp_path / f"case{case}"
        out = work / "out"
        out.mkdir(parents=True)
        src = inputs[kind]
        target = work / src.name
        shutil.copytree(src, target) if src.is_dir() else shutil.copy(src, target)
        victim = target / name if src.is_dir() else target
        {"truncate": truncate, "flip": flip, "retype": retype}[how](victim, rng)
        verbs = verbs_for(kind, target, inputs, out, train_args)
        argv = verbs[rng.choice([v for v in READERS[name] if v in verbs])]
        what = f"case {case}: {how} {kind}/{name} -> moelab {' '.join(argv[:2])}"
        code = main(argv)
        err = capsys.readouterr().err
        assert code in (0, 2), what
        outcomes[code] += 1
        leftovers = [p for p in work.rglob("*") if p.name.endswith((".tmp", ".json.tmp")) or ".partial" in p.name]
        assert not leftovers, f"{what}: left {leftovers}"
        if code == 2:
            lines = [line for line in err.splitlines() if "error" in line]
            assert len(lines) == 1 and "Traceback" not in err, f"{what}: {err}"
            assert not (out / "t.parquet").exists() and not (out / "hf").exists() and not (out / "conv").exists(), what
        elif how == "truncate" and kind != "preset":  # (a TOML cut at a line end is a valid preset)
            pytest.fail(f"{what}: a truncated file was accepted")
        shutil.rmtree(work)
    assert outcomes[2] > CASES // 2, outcomes
