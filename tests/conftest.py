import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_sessionstart(session):
    """The versions every result depends on, first in the log even under -q (.ci/run installs the newest
    transformers, so a failure must say which one it met)."""
    import importlib.metadata as md

    found = []
    for name in ("torch", "transformers", "accelerate"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} not installed")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("moelab under test with " + ", ".join(found))


@pytest.fixture(scope="session")
def vectors():
    path = SHARED / "reference" / "vectors.json"
    if not path.is_file():
        pytest.skip(f"reference vectors not found at {path}")
    return json.loads(path.read_text())


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


TINY_PRESET = """
[model]
vocab_size = 512
d_model = 32
n_layers = 2
n_heads = 2
ffn_hidden = 64
max_seq_len = 32

[model.moe]
num_experts = 4
top_k = 2
moe_every = 1
expert_hidden = 32
capacity_factor_train = 1.25
capacity_factor_eval = 2.0
"""


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny corpus, a second corpus of the same vocabulary size from another tokenizer, a small preset
    and a 2-step run (checkpoints at steps 1 and 2), all written through `moelab.cli.main`."""
    from moelab.cli import main

    d = tmp_path_factory.mktemp("tiny_run")
    (d / "tiny.toml").write_text(TINY_PRESET)
    assert main(["data", "build", "--out", str(d / "corpus"), "--source", "python-docs", "--source", "math:200",
                 "--vocab-size", "512", "--max-bytes-per-source", "20000"]) == 0
    assert main(["data", "build", "--out", str(d / "other"), "--source", "math:400", "--vocab-size", "512",
                 "--seed", "3"]) == 0
    assert main(["train", "--preset", str(d / "tiny.toml"), "--data", str(d / "corpus"), "--out", str(d / "run"),
                 *tiny_train_args(steps=2), "--save-every", "1"]) == 0
    return d


@pytest.fixture
def one_line(capsys):
    """one_line(needle) -> the stderr of a refused command, which must be one line holding needle and no traceback."""
    def check(needle: str) -> str:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
        return err[0]
    return check


@pytest.fixture(scope="session")
def tiny_trace(tiny_run, tmp_path_factory):
    """The tiny run's checkpoint traced over 96 held-out tokens (its own routing, seq_len 16). Read-only:
    a test that damages a trace copies it first."""
    from moelab.cli import main

    trace = tmp_path_factory.mktemp("tiny_trace") / "own.parquet"
    assert main(["trace", str(tiny_run / "run"), "--data", str(tiny_run / "corpus"), "--tokens", "96",
                 "--out", str(trace)]) == 0
    return trace


@pytest.fixture(scope="session")
def train_args():
    """`train` flags that keep a tiny run to a second: train_args(steps) -> argv list."""
    return tiny_train_args


def tiny_train_args(steps: int = 2) -> list[str]:
    return ["--steps", str(steps), "--set", "data.seq_len=16", "--set", "data.batch_size=2",
            "--set", "train.tensorboard=false", "--set", "train.eval_tokens=16", "--set", "train.warmup_steps=1"]
