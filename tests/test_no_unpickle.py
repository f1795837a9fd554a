"""Nothing moelab reads is unpickled: a malicious pickle planted in place of every file a verb reads
runs nothing, and the verb says one line and exits 2.

The payload is the classic one (`__reduce__` returning a callable and its arguments): unpickling it
calls `exec`, which writes a marker file. `torch.load(weights_only=False)`, `np.load(allow_pickle=True)`
or `pickle.load` on any of these files would create the marker; the test fails if it exists.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moelab.cli import main


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _plant(path: Path, kind: str, marker: Path) -> None:
    path.unlink(missing_ok=True)
    if kind == "torch":  # what the old optimizer.pt / rng.pt were: torch.save's zip around a pickle
        torch.save({"state": Payload(marker)}, path)
    elif kind == "npy":  # an object array: its data is a pickle
        np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def test_the_payload_works(tmp_path):
    """The planted files are live: loading them the unsafe way runs the payload."""
    for kind, load in (("torch", lambda p: torch.load(p, weights_only=False)),
                       ("npy", lambda p: np.load(p, allow_pickle=True)),
                       ("pickle", lambda p: pickle.loads(p.read_bytes()))):
        marker = tmp_path / f"{kind}.marker"
        _plant(tmp_path / f"x.{kind}", kind, marker)
        load(tmp_path / f"x.{kind}")
        assert marker.read_text() == "pwned"


CKPT_FILES = ["model.safetensors", "config.json", "state.json", "optimizer.safetensors", "rng.safetensors",
              "optimizer.pt", "rng.pt"]
CORPUS_FILES = ["tokens.npy", "docs.parquet", "corpus.json", "tokenizer.json"]


def _cases():
    for name in CKPT_FILES:
        for kind in ("torch", "pickle"):
            yield "ckpt", name, kind
    for name in CORPUS_FILES:
        yield "corpus", name, "npy" if name.endswith(".npy") else "pickle"
    yield "hf", "config.json", "pickle"


@pytest.mark.parametrize("where, name, kind", list(_cases()))
def test_a_planted_pickle_runs_nothing(tiny_run, tmp_path, capsys, train_args, where, name, kind):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run / "run" / "checkpoints" / "step_000001", ckpt)
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_run / "corpus", corpus)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "mixtral"}')
    shutil.copy(ckpt / "model.safetensors", hf / "model.safetensors")
    marker = tmp_path / "marker"
    if name.endswith(".pt"):  # a checkpoint of the old format: pickles instead of the safetensors files
        for new in ("optimizer.safetensors", "rng.safetensors"):
            (ckpt / new).unlink()
    _plant({"ckpt": ckpt, "corpus": corpus, "hf": hf}[where] / name, kind, marker)
    data = ["--data", str(corpus)]
    verbs = {
        "ckpt": [["eval", str(ckpt), *data, "--tokens", "16"], ["generate", str(ckpt), "--prompt", "def"],
                 ["trace", str(ckpt), *data, "--tokens", "16", "--out", str(tmp_path / "t.parquet")],
                 ["convert", "--to-hf", str(ckpt), "--out", str(tmp_path / "hf_out")],
                 ["train", "--preset", str(tiny_run / "tiny.toml"), *data, "--out", str(tmp_path / "r"),
                  "--resume", str(ckpt), *train_args(steps=3)]],
        "corpus": [["eval", str(tiny_run / "run"), *data, "--tokens", "16"], ["data", "info", str(corpus)],
                   ["generate", str(tiny_run / "run"), "--prompt", "def", "--tokenizer", str(corpus / name)],
                   ["train", "--preset", str(tiny_run / "tiny.toml"), *data, "--out", str(tmp_path / "r"),
                    *train_args(steps=1)]],
        "hf": [["convert", "--from-hf", str(hf), "--out", str(tmp_path / "conv")]],
    }[where]
    codes = []
    for argv in verbs:
        codes.append(main(argv))
        assert not marker.exists(), f"{' '.join(argv[:2])} unpickled {name}"
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert 2 in codes, f"no verb noticed the planted {name}"
    assert all("Traceback" not in line for line in err)
    if name in ("optimizer.pt", "rng.pt"):  # the old format is named as such, not read
        assert any("older moelab" in line and "unpickle" in line for line in err), err
