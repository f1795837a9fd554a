"""The OLMoE rows at smoke scale, through the registry."""

import dataclasses
import math

import pytest
import torch

from moelab.claims.registry import all_rows, run_row
from moelab.claims.verdict import VERDICTS
from moelab.claims.workspace import Scale, Workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    # One folder for the session: the row test modules share the smoke runs and traces through the cache.
    # One torch thread: on a shared machine a second one mostly spins (20x the CPU time for these models).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Workspace(tmp_path_factory.getbasetemp() / "claims-smoke-rows", dataclasses.replace(Scale.smoke(), threads=1),
                    log=lambda m: None)
    torch.set_num_threads(threads)


def sane(r, name, paper):
    assert r.row == name and r.paper == paper and r.verdict in VERDICTS and r.seconds > 0
    m = r.measure
    assert all(math.isfinite(v) for v in (m.value, m.ci_low, m.ci_high, m.null))
    assert m.ci_low <= m.value <= m.ci_high
    assert "tiny-moe" in r.setup and r.claim and r.paper_number and r.measured and r.note


def test_saturation(ws):
    r = run_row(all_rows()["olmoe-saturation"], ws)
    sane(r, "olmoe-saturation", "OLMoE")
    d = r.details
    first = d["curve"][0]
    assert d["step"] == first["step"]  # the earliest snapshot is the one nearest 10% at smoke scale
    assert r.measure.value == pytest.approx(first["topk_overlap_mean"])
    assert d["rise_first_to_last_snapshot"] == pytest.approx(d["curve"][-1]["topk_overlap_mean"]
                                                             - first["topk_overlap_mean"])


def test_vocab_and_domain(ws):
    v = run_row(all_rows()["olmoe-vocab-specialisation"], ws)
    sane(v, "olmoe-vocab-specialisation", "OLMoE")
    assert len(v.details["per_layer"]) == 2 and v.measure.value <= 1
    d = run_row(all_rows()["olmoe-domain-specialisation"], ws)
    sane(d, "olmoe-domain-specialisation", "OLMoE")
    shares = d.details["per_domain_max_share_by_layer"]
    assert set(shares) == {"code", "math", "prose"} and all(len(s) == 2 for s in shares.values())
    assert d.measure.value == pytest.approx(sum(sum(s) for s in shares.values()) / 6)  # mean over domains, layers
    assert d.details["vocab_specialisation"]["value"] == pytest.approx(v.measure.value)
