"""Tiny traces with planted routing, written with moelab's own TraceWriter.

4 sequences of 24 tokens (doc = seq), 3 MoE layers of 8 experts, top-2. Planted:
- token 7 goes to expert 5 (rank 0) at layer 1 wherever it appears (a high-lift token);
- in domain "code" (seqs 0 and 2) layer 2's rank-0 choice is always expert 3;
- a few rank-1 choices are dropped (weight 0).
`variant="b"` changes layer 1 only: a new top-1 at (seq 0, pos 3) and (seq 0, pos 5), and the two choices
of (seq 1, pos 4) swapped (same set, new top-1): the diff's answer.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from moelab.trace.io import TraceWriter
from moelab.trace.schema import TraceMeta

SEQS, SEQ_LEN, LAYERS, E, K = 4, 24, 3, 8, 2
CHANGED = [(0, 3), (0, 5)]
SWAPPED = (1, 4)


def routing(variant: str = "a"):
    """Per (seq, pos, layer): the K experts, weights, probs, dropped flags; and per (seq, pos) the token."""
    rng = np.random.default_rng(0)
    tokens_ST = rng.integers(8, 40, size=(SEQS, SEQ_LEN))
    tokens_ST[:, ::5] = 7
    experts = np.zeros((SEQS, SEQ_LEN, LAYERS, K), np.int64)
    probs = np.zeros((SEQS, SEQ_LEN, LAYERS, K))
    for s in range(SEQS):
        for t in range(SEQ_LEN):
            for l in range(LAYERS):
                pick = rng.permutation(E)[:K]
                if l == 1 and tokens_ST[s, t] == 7:
                    pick = np.array([5, (pick[0] if pick[0] != 5 else pick[1])])
                if l == 2 and s % 2 == 0:
                    pick = np.array([3, (pick[0] if pick[0] != 3 else pick[1])])
                if variant == "b" and l == 1 and (s, t) in CHANGED:  # a new expert takes rank 0
                    pick = np.array([min(set(range(E)) - set(pick.tolist())), pick[0]])
                if variant == "b" and l == 1 and (s, t) == SWAPPED:  # same set, order swapped
                    pick = pick[::-1].copy()
                experts[s, t, l] = pick
                p0 = 0.3 + 0.4 * rng.random()
                probs[s, t, l] = [p0, p0 * rng.random()]
    weights = probs / probs.sum(-1, keepdims=True)
    dropped = np.zeros_like(weights, bool)
    dropped[1, 2:6, 0, 1] = True
    weights[dropped] = 0.0
    return tokens_ST, experts, weights, probs, dropped


def write_trace(path, variant: str = "a"):
    tokens_ST, experts, weights, probs, dropped = routing(variant)
    n_tok = SEQS * SEQ_LEN
    seq_T = np.repeat(np.arange(SEQS), SEQ_LEN)
    per_row = lambda a_T: np.repeat(a_T, LAYERS * K)  # noqa: E731
    cols = {
        "seq": per_row(seq_T), "pos": per_row(np.tile(np.arange(SEQ_LEN), SEQS)),
        "token": per_row(tokens_ST.reshape(-1)),
        "domain": per_row(np.where(seq_T % 2 == 0, "code", "web")),
        "lang": per_row(np.where(seq_T < 2, "en", "de")),
        "layer": np.tile(np.repeat(np.arange(LAYERS), K), n_tok), "rank": np.tile(np.arange(K), n_tok * LAYERS),
        "expert": experts.reshape(-1), "weight": weights.reshape(-1), "prob": probs.reshape(-1),
        "dropped": dropped.reshape(-1),
    }
    meta = TraceMeta(num_experts=[E] * LAYERS, top_k=K, source="moelab",
                     labels={"domain": ["code", "web"], "lang": ["en", "de"]})
    with TraceWriter(path, meta) as w:
        w.write(cols)
    return path


@pytest.fixture(scope="session")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("explore")
    return write_trace(d / "a.parquet"), write_trace(d / "b.parquet", "b")


@pytest.fixture(scope="session")
def explorer(traces):
    from moelab.explore.commands import build_explorer

    return build_explorer([str(p) for p in traces])


# ---- the browser tests' Chromium (test_browser*.py) ----
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _need_browser():
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install playwright)"
    else:
        missing = None if os.path.exists(CHROMIUM) else "chromium is not installed (apt-get install chromium)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests need a browser under CI: {missing}")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each test's call report on the item, so a fixture can screenshot a failure."""
    rep = (yield).get_result()
    if rep.when == "call":
        item.rep_call = rep
