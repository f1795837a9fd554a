"""The rows' held-out losses run where the workspace trains (`--device`), not always on the CPU."""

import dataclasses

import pytest

from moelab.claims import rows_depth, rows_openmoe, rows_rmoe
from moelab.claims.workspace import Scale, Workspace


class Stop(Exception):
    pass


@pytest.mark.parametrize("device, want", [(None, "cpu"), ("cuda:1", "cuda:1")])
@pytest.mark.parametrize("module, call", [(rows_openmoe, lambda ws: rows_openmoe.moe_beats_dense(ws)),
                                          (rows_rmoe, lambda ws: rows_rmoe._losses(ws, "gru", 1)),
                                          (rows_depth, lambda ws: rows_depth.depth_scan(ws))])
def test_held_out_losses_are_asked_on_the_workspaces_device(tmp_path, monkeypatch, device, want, module, call):
    ws = Workspace(tmp_path, dataclasses.replace(Scale.smoke(), threads=1), log=lambda m: None, device=device)
    assert ws.eval_device == want
    asked = []

    def fake(*args, device="cpu", **kw):
        asked.append(device)
        raise Stop

    monkeypatch.setattr(module, "seq_losses", fake)
    monkeypatch.setattr(ws, "corpus", lambda *a, **k: tmp_path / "corpus")
    for name in ("base_run", "rmoe8_run", "depth_run", "final"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda *a, **k: tmp_path / "run")
    with pytest.raises(Stop):
        call(ws)
    assert asked == [want]
