"""A bad `MOELAB_CPU_EXPERTS` is refused when `moelab` starts, before a verb writes anything (it used to
surface only at the first MoE forward, after `train` had made its run folder and `demo` had trained a
model)."""

from __future__ import annotations

import pytest

from moelab.cli import main
from moelab.config import MoelabError
from moelab.model.cpu_experts import CPU_EXPERTS_ENV, cpu_experts_mode


@pytest.mark.parametrize("value, mode", [(None, "auto"), ("", "auto"), (" ONEDNN ", "onednn"), ("matmul", "matmul")])
def test_cpu_experts_mode_reads_the_environment(monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv(CPU_EXPERTS_ENV, raising=False)
    else:
        monkeypatch.setenv(CPU_EXPERTS_ENV, value)
    assert cpu_experts_mode() == mode


def test_cpu_experts_mode_refuses_other_values(monkeypatch):
    monkeypatch.setenv(CPU_EXPERTS_ENV, "bogus")
    with pytest.raises(MoelabError, match="MOELAB_CPU_EXPERTS='bogus' is not one of auto, onednn, matmul"):
        cpu_experts_mode()


@pytest.mark.parametrize("verb", ["train", "demo"])
def test_a_bad_value_is_refused_before_anything_is_written(tiny_run, tmp_path, capsys, monkeypatch, verb):
    monkeypatch.setenv(CPU_EXPERTS_ENV, "bogus")
    out = tmp_path / "out"
    argv = {"train": ["train", "--preset", str(tiny_run / "tiny.toml"), "--data", str(tiny_run / "corpus"),
                      "--out", str(out), "--steps", "1"],
            "demo": ["demo", "--quick", "--out", str(out)]}[verb]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moelab {verb}: error: MOELAB_CPU_EXPERTS='bogus' is not one of auto, onednn, matmul"]
    assert not out.exists()
