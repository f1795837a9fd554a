"""Fuzz: randomly corrupted corpora, checkpoints, presets and Hugging Face folders, fed to every verb that
reads them, in process through `moelab.cli.main`.

Each case copies one input, damages one of its files (truncation, flipped bytes, or a JSON/TOML value
replaced by one of another type) and runs one reader verb on it. A verb may succeed (a flipped byte
inside a weight is a valid file with another number in it), but otherwise it must exit 2 with exactly
one error line, raise nothing, and leave no half-written output: no trace, no converted folder, no
`.tmp` / `.partial` staging left behind. Truncations and type changes of required values must fail.
Traces are not fuzzed here: their reader (`trace/io.py`) validates them and has its own tests. Other
tools' routing files are: `trace import` of Megatron and OLMoE JSONL with random JSON shapes and values
spliced in (floats, booleans, huge and negative ints, NaN, strings, nesting 200,000 deep, cut lines), and
of replay arrays of random dtype, shape and companions; each exits 0 with a readable trace or 2 with one
line, leaving nothing behind.
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


# ---- trace import: random JSON shapes and values (issue 24) -------------------------------------------
JSON_VALUES = [0, 1, 3, -1, -(2**15), 2**15 - 1, 2**15, 2**31, 10**30, 1.5, 2.0, float("nan"), float("inf"),
               True, False, None, "", "7", "zero", [], [[]], [0, 1], [[0, 1]], [[0.5, 1]], {}, {"a": 1}]


def _megatron_records(rng: random.Random) -> list:
    """A valid RouterTracer forward or two: the starting point each case damages."""
    T, K, layers = rng.randint(1, 4), rng.randint(1, 3), sorted(rng.sample(range(6), rng.randint(1, 3)))
    return [{"step": s, "stage": "pre_dispatch", "block": "decoder", "layer": l, "rank": 0, "num_tokens": T,
             "topk": K, "top_indices": [rng.sample(range(8), K) for _ in range(T)]}
            for s in range(rng.randint(1, 2)) for l in layers]


def _olmoe_records(rng: random.Random) -> list:
    T, K, L = rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 3)
    return [{"input_ids": [rng.randrange(1000) for _ in range(T)],
             "exp_ids": [[[rng.randrange(8) for _ in range(L)] for _ in range(K)] for _ in range(T)]}
            for _ in range(rng.randint(1, 3))]


def _damage(node, rng: random.Random):
    """Replace one value somewhere inside `node` (a dict or list tree) by a value of any JSON shape."""
    if isinstance(node, (dict, list)) and node and rng.random() < 0.75:
        key = rng.choice(sorted(node)) if isinstance(node, dict) else rng.randrange(len(node))
        node[key] = _damage(node[key], rng)
        return node
    pick = rng.random()
    if pick < 0.08:
        depth = rng.choice([50, 5000, 200_000])
        return json.loads("[" * min(depth, 900) + "]" * min(depth, 900)) if depth < 1000 else ("DEEP", depth)
    return json.loads(json.dumps(rng.choice(JSON_VALUES)))


def _lines(records: list, rng: random.Random) -> str:
    out = []
    for rec in records:
        text = json.dumps(rec)
        if '["DEEP", ' in text:  # a nesting deeper than json.dumps would write: spliced in as text
            depth = int(text.split('["DEEP", ')[1].split("]")[0])
            text = text.replace(f'["DEEP", {depth}]', "[" * depth + "]" * depth)
        out.append(text)
    if rng.random() < 0.1:
        out.insert(rng.randrange(len(out) + 1), rng.choice(["[1, 2]", "null", "{oops", "7", '"text"']))
    if rng.random() < 0.1:
        out[-1] = out[-1][: rng.randrange(len(out[-1]))]  # a line cut short
    return "\n".join(out) + "\n"


def test_import_formats_fuzz_exit_0_or_2_and_nothing_left(tmp_path, capsys):
    from moelab.trace.io import open_trace

    rng = random.Random(24)
    outcomes = {0: 0, 2: 0}
    for case in range(300):
        fmt = rng.choice(["megatron", "olmoe"])
        records = _megatron_records(rng) if fmt == "megatron" else _olmoe_records(rng)
        for _ in range(rng.randint(0, 2)):
            _damage(records, rng)
        work = tmp_path / f"case{case}"
        work.mkdir()
        src = work / "router_trace_rank0.jsonl"
        src.write_text(_lines(records, rng))
        out = work / "t.parquet"
        argv = ["trace", "import", fmt, str(src), "--out", str(out)]
        if rng.random() < 0.3:
            argv += ["--num-experts", str(rng.choice([0, 1, 8, 64, 2**15, 2**15 + 1, 10**9, -3]))]
        if fmt == "megatron" and rng.random() < 0.2:
            argv += ["--micro-batch", str(rng.choice([0, 1, 2, 3, 10**12]))]
        what = f"case {case}: {fmt} {src.read_text()[:300]!r} {argv[5:]}"
        code = main(argv)
        err = capsys.readouterr().err
        outcomes[_import_outcome(code, err, work, src, what)] += 1
        if code == 0:
            trace = open_trace(out)  # what was written is a valid trace, ids within its own metadata
            for batch in trace.iter_batches(columns=["layer", "rank", "expert"]):
                assert batch["expert"].min() >= 0 and batch["rank"].max() < trace.meta.top_k
        shutil.rmtree(work)
    print("import fuzz outcomes", outcomes)
    assert outcomes[0] > 30 and outcomes[2] > 100, outcomes


def _replay_arrays(rng: random.Random):
    """Replay arrays of random dtype, shape and values, with random companions in .safetensors."""
    import numpy as np

    nrng = np.random.default_rng(rng.randrange(2**32))
    shape = tuple(rng.randint(0, 4) for _ in range(rng.choice([1, 2, 3, 3, 3, 4, 5])))
    dtype = rng.choice(["int8", "int16", "int32", "int64", "uint8", "uint32", "float32", "bool"])
    hi = rng.choice([2, 8, 2**15 + 2, 2**40])
    ids = nrng.integers(-2, hi, size=shape).astype(dtype)
    arrays = {"routed_experts": ids}
    for name in ("input_ids", "routed_lens", "token_lens", "layer_blocks"):
        if rng.random() < 0.3:
            n = rng.randint(0, 5)
            arrays[name] = nrng.integers(rng.choice([-5, 0]), rng.choice([3, 2**31 + 5]), size=n).astype(
                rng.choice(["int32", "int64", "float32"]))
    return arrays


def test_replay_import_fuzz_exit_0_or_2_and_nothing_left(tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    rng = random.Random(25)
    outcomes = {0: 0, 2: 0}
    for case in range(150):
        arrays = _replay_arrays(rng)
        work = tmp_path / f"case{case}"
        work.mkdir()
        if rng.random() < 0.5:
            src = work / "r.npy"
            np.save(src, arrays["routed_experts"], allow_pickle=False)
        else:
            src = work / "r.safetensors"
            save_file(arrays, str(src))
        out = work / "t.parquet"
        code = main(["trace", "import", "replay", str(src), "--out", str(out)])
        err = capsys.readouterr().err
        what = f"case {case}: {src.name} { {k: (v.dtype, v.shape) for k, v in arrays.items()} }"
        outcomes[_import_outcome(code, err, work, src, what)] += 1
        shutil.rmtree(work)
    print("replay fuzz outcomes", outcomes)
    assert outcomes[0] > 5 and outcomes[2] > 50, outcomes


def _import_outcome(code, err, work, src, what):
    """An import either wrote the trace and its sidecar (0) or refused in one line leaving nothing (2)."""
    assert code in (0, 2) and "Traceback" not in err, f"{what}: {err}"
    left = sorted(p.name for p in work.iterdir() if p != src)
    if code == 2:
        assert len([line for line in err.splitlines() if "error" in line]) == 1, f"{what}: {err}"
        assert not left, f"{what}: left {left}"
    else:
        assert left == ["t.parquet", "t.parquet.json"], f"{what}: left {left}"
    return code
