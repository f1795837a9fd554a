"""Optimizer and RNG state round-trip through safetensors + JSON exactly, and bad files say one line."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moelab.config import MoelabError
from moelab.train import state_io
from moelab.train.config import TrainConfig
from moelab.train.optim import build_optimizer


def _stepped(kind: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = build_optimizer(model, TrainConfig(optimizer=kind))
    for _ in range(2):
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_optimizer_state_round_trips_and_resumes_identically(tmp_path, kind):
    model, opt = _stepped(kind)
    state_io.save_optimizer_state(opt.state_dict(), tmp_path / "o.safetensors")
    loaded = state_io.load_optimizer_state(tmp_path / "o.safetensors")
    want = opt.state_dict()
    assert loaded["param_groups"] == want["param_groups"]  # tuples (betas, eps) come back as tuples
    assert loaded["state"].keys() == want["state"].keys()
    for i, slots in want["state"].items():
        for key, value in slots.items():
            assert torch.equal(loaded["state"][i][key], value), (i, key)
    # a copy of the model with the loaded state takes the same next step as the original
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, TrainConfig(optimizer=kind))
    state_io.check_fits(loaded, [p for g in twin_opt.param_groups for p in g["params"]], tmp_path)
    twin_opt.load_state_dict(loaded)
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (twin, twin_opt)):
        m(x).square().sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_rng_state_round_trips(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    state_io.save_rng_state(tmp_path / "rng.safetensors")
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    state_io.load_rng_state(tmp_path / "rng.safetensors")
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_malformed_state_files_are_one_line_errors(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"torch": torch.zeros(3, dtype=torch.uint8)}, str(path), metadata={"moelab": json.dumps(
        {"numpy": ["MT19937", 0, 0, 0.0], "python": [3, [1, 2], None]})})
    before = torch.get_rng_state()
    with pytest.raises(MoelabError, match="malformed RNG state"):
        state_io.load_rng_state(path)
    assert torch.equal(torch.get_rng_state(), before)  # nothing was set from the bad file
    save_file({"a": torch.zeros(1)}, str(path))  # no moelab metadata at all
    with pytest.raises(MoelabError, match="not a moelab state file"):
        state_io.load_optimizer_state(path)
    model, opt = _stepped("adamw")
    osd = opt.state_dict()
    osd["state"][0]["exp_avg"] = torch.zeros(7)  # the wrong shape would only fail inside opt.step()
    with pytest.raises(MoelabError, match="exp_avg of parameter 0 is \\(7,\\), expected \\(4, 3\\)"):
        state_io.check_fits(osd, [p for g in opt.param_groups for p in g["params"]], path)


def test_legacy_pickles_are_named_not_read(tmp_path):
    (tmp_path / "optimizer.pt").write_bytes(b"\x80\x04 not even read")
    with pytest.raises(MoelabError, match="older moelab .*no longer unpickles"):
        state_io.refuse_legacy(tmp_path)


def test_cuda_rng_states_of_more_gpus_than_here_restore_the_ones_here(tmp_path, monkeypatch):
    """A checkpoint written where 2 GPUs were visible, resumed where 1 is: GPU 0's state is restored and
    the other is left (set_rng_state_all indexed past the devices here: a raw IndexError). Only torch.cuda's
    device list and setter are stood in for; the file is written and read as shipped."""
    two = [torch.Generator().manual_seed(i).get_state() for i in range(2)]  # stand-ins for 2 GPUs' states
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: two)
    state_io.save_rng_state(tmp_path / "rng.safetensors")
    restored = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [restored.setdefault(i, s)
                                                                           for i, s in enumerate(states)])

    size = two[0].numel()

    def set_one(state, device):
        if state.numel() != size:
            raise RuntimeError("RNG state is wrong size")
        restored[device] = state

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_one)
    state_io.load_rng_state(tmp_path / "rng.safetensors")
    assert list(restored) == [0] and torch.equal(restored[0], two[0])
    two[0] = torch.zeros(3, dtype=torch.uint8)  # a malformed state: one line naming the file
    state_io.save_rng_state(tmp_path / "bad.safetensors")
    with pytest.raises(MoelabError, match="bad.safetensors: malformed CUDA RNG state 0"):
        state_io.load_rng_state(tmp_path / "bad.safetensors")


def test_a_resumed_optimizer_runs_the_kernels_this_machine_chose(tmp_path):
    """A checkpoint of a run whose AdamW was not fused, resumed where build_optimizer picks fused AdamW (CUDA):
    torch's load_state_dict keeps the writer's flags, so the resumed run stayed unfused. Its hyperparameters
    and moments still come from the checkpoint, and the next step equals the unfused run's."""
    from moelab.train.checkpoint import this_machine_s_kernels

    p = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    written = torch.optim.AdamW([p], lr=1e-2, fused=None)
    for _ in range(2):
        p.grad = torch.ones_like(p)
        written.step()
    state_io.save_optimizer_state(written.state_dict(), tmp_path / "opt.safetensors")
    osd = state_io.load_optimizer_state(tmp_path / "opt.safetensors")
    q = torch.nn.Parameter(p.detach().clone())
    resumed = torch.optim.AdamW([q], lr=1e-3, fused=True)
    resumed.load_state_dict(this_machine_s_kernels(osd, resumed))
    group = resumed.param_groups[0]
    assert group["fused"] is True and group["lr"] == 1e-2
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    written.step()
    resumed.step()
    torch.testing.assert_close(q, p)
