"""Issue 23.9: the full router distribution in the path panel and the colouring by router entropy, in
Chromium, on planted distributions whose entropies are worked out by hand below (nats).

One sequence of 6 tokens, 2 layers of 4 experts, top-2. Token t has distribution D[t] at layer 0 and
D[5 - t] at layer 1. Variants: `probs` as float32, as float16 (a reader may get either), only the top 3
(`topn_experts` / `topn_probs`, no `probs`), and neither (the "nothing" case: the option is disabled).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moelab.explore.commands import build_explorer
from moelab.explore.server import bind, serve_in_thread, url_of
from moelab.trace.io import TraceWriter
from moelab.trace.schema import TraceMeta

D = [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.125, 0.125],
     [0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]]
# by hand: -sum p ln p
H = [0.0,                                   # one expert
     math.log(2),                           # 0.693147: two halves
     math.log(4),                           # 1.386294: uniform over 4
     1.75 * math.log(2),                    # 1.213008: 1/2 ln 2 + 1/4 ln 4 + 2 * 1/8 ln 8 = 1.75 ln 2
     0.249672 + 0.690776,                   # 0.940448: -0.7 ln 0.7 - 3 * 0.1 ln 0.1
     0.733033 + 0.460517]                   # 1.193550: -2 * 0.4 ln 0.4 - 2 * 0.1 ln 0.1
T, L, E, K = 6, 2, 4, 2


def dist(t: int, layer: int) -> list[float]:
    return D[t] if layer == 0 else D[T - 1 - t]


def write(path, kind: str):
    rows = [(t, l, k) for t in range(T) for l in range(L) for k in range(K)]
    top = {(t, l): sorted(range(E), key=lambda e: (-dist(t, l)[e], e)) for t in range(T) for l in range(L)}
    cols = {"seq": np.zeros(len(rows), np.int64), "pos": np.array([t for t, _, _ in rows]),
            "token": np.array([t + 1 for t, _, _ in rows]), "layer": np.array([l for _, l, _ in rows]),
            "rank": np.array([k for _, _, k in rows]),
            "expert": np.array([top[(t, l)][k] for t, l, k in rows]),
            "prob": np.array([dist(t, l)[top[(t, l)][k]] for t, l, k in rows]),
            "weight": np.full(len(rows), 0.5), "dropped": np.zeros(len(rows), bool)}
    if kind in ("full", "half"):
        cols["probs"] = np.array([dist(t, l) for t in range(T) for l in range(L)], np.float32)  # rank-0 rows
    with TraceWriter(path, TraceMeta(num_experts=[E] * L, top_k=K, source="moelab")) as w:
        w.write(cols)
    if kind in ("full", "half", "topn"):
        table = pq.read_table(path)
        if kind in ("full", "half"):  # the writer stores float16; "full" stands for an older float32 file
            i = table.schema.get_field_index("probs")
            width = pa.float32() if kind == "full" else pa.float16()
            exact = pa.array([dist(t, l) if k == 0 else None for t, l, k in rows], pa.list_(pa.float32()))
            table = table.set_column(i, "probs", exact.cast(pa.list_(width)))
        else:  # what `--probs top:3` writes: the top 3 experts and probabilities on rank-0 rows
            rank0 = [k == 0 for _, _, k in rows]
            ex = [top[(t, l)][:3] if r else None for (t, l, _), r in zip(rows, rank0)]
            pr = [[dist(t, l)[e] for e in top[(t, l)][:3]] if r else None for (t, l, _), r in zip(rows, rank0)]
            table = table.append_column("topn_experts", pa.array(ex, pa.list_(pa.int16())))
            table = table.append_column("topn_probs", pa.array(pr, pa.list_(pa.float32())))
        pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    servers = {k: bind(build_explorer([str(write(d / f"{k}.parquet", k))]), "127.0.0.1", 0)
               for k in ("full", "half", "topn", "none")}
    for s in servers.values():
        serve_in_thread(s)
    yield {k: url_of(s) for k, s in servers.items()}
    for s in servers.values():
        s.shutdown()
        s.server_close()


def open_page(browser, url):
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(url)
    pg.wait_for_selector("#token-area .tok")
    return pg, errors


@pytest.mark.parametrize("kind", ["full", "half"])
def test_entropy_colouring_and_full_distribution(browser, sites, kind):
    pg, errors = open_page(browser, sites[kind])
    try:
        assert not pg.is_disabled("#colour-by option[value='entropy']") and pg.is_hidden("#colour-note")
        pg.select_option("#colour-by", "entropy")
        for layer in range(L):
            pg.fill("#layer-slider", str(layer))
            pg.dispatch_event("#layer-slider", "input")
            got = pg.eval_on_selector_all("#token-area .tok", "els => els.map(e => +e.dataset.entropy)")
            want = [H[t] if layer == 0 else H[T - 1 - t] for t in range(T)]
            assert got == pytest.approx(want, abs=1e-4 if kind == "full" else 2e-3)  # float16: 0.7 is 0.7002
            if kind == "half":  # exactly the entropy of the stored float16 values, normalised to sum 1
                q = [np.float16(np.array(dist(t, layer))).astype(np.float64) for t in range(T)]
                exact = [float(-(x[x > 0] / x.sum() * np.log(x[x > 0] / x.sum())).sum()) for x in q]
                assert got == pytest.approx(exact, abs=1e-4)
        colours = pg.eval_on_selector_all("#token-area .tok", "els => els.map(e => e.style.background)")
        assert colours[0] != colours[2] and colours[3] != colours[2]  # layer 1: H = 1.19 vs ln 4 vs 0.94 differ
        legend = pg.inner_text("#colour-legend")
        assert "nats" in legend and "ln 4" in legend and f"{math.log(4):.2f}" in legend and pg.is_hidden("#legend")

        pg.fill("#layer-slider", "0")
        pg.dispatch_event("#layer-slider", "input")
        pg.hover("#token-area .tok[data-i='3']")
        pg.wait_for_selector("#dist-box .dist")
        for layer in range(L):
            bars = pg.locator(f"#dist-box .dist[data-layer='{layer}'] .bar")
            assert bars.count() == E
            ps = bars.evaluate_all("bs => bs.map(b => +b.dataset.p)")
            assert ps == pytest.approx(dist(3, layer), abs=1e-3)
            chosen = bars.evaluate_all("bs => bs.filter(b => b.classList.contains('chosen')).map(b => +b.dataset.expert)")
            top2 = sorted(range(E), key=lambda e: (-dist(3, layer)[e], e))[:K]
            assert sorted(chosen) == sorted(top2)
            h = float(pg.get_attribute(f"#dist-box .dist[data-layer='{layer}'] .h", "data-entropy"))
            assert h == pytest.approx(H[3] if layer == 0 else H[2], abs=1e-4 if kind == "full" else 2e-3)
        assert "nats" in pg.inner_text("#dist-note")
        pg.select_option("#colour-by", "expert")
        assert pg.is_visible("#legend") and pg.is_hidden("#colour-legend")
        assert not errors, errors
    finally:
        pg.close()


def test_top_n_shows_n_bars_and_no_entropy(browser, sites):
    pg, errors = open_page(browser, sites["topn"])
    try:
        assert pg.is_disabled("#colour-by option[value='entropy']")
        note = pg.inner_text("#colour-note")
        assert "only the top 3" in note and "--probs full" in note
        pg.hover("#token-area .tok[data-i='4']")
        pg.wait_for_selector("#dist-box .dist")
        for layer in range(L):
            bars = pg.locator(f"#dist-box .dist[data-layer='{layer}'] .bar")
            top3 = sorted(range(E), key=lambda e: (-dist(4, layer)[e], e))[:3]
            assert bars.evaluate_all("bs => bs.map(b => +b.dataset.expert)") == top3
            assert bars.evaluate_all("bs => bs.map(b => +b.dataset.p)") == pytest.approx(
                [dist(4, layer)[e] for e in top3], abs=1e-6)
        assert "rest of the distribution is not stored" in pg.inner_text("#dist-note")
        assert not errors, errors
    finally:
        pg.close()


def test_no_distribution_disables_entropy_with_its_reason(browser, sites):
    pg, errors = open_page(browser, sites["none"])
    try:
        assert pg.is_disabled("#colour-by option[value='entropy']")
        reason = "this trace stores no full router distribution; trace with --probs full"
        assert reason in pg.inner_text("#colour-note")
        assert pg.get_attribute("#colour-by option[value='entropy']", "title") == reason
        pg.hover("#token-area .tok[data-i='1']")
        pg.wait_for_selector("#dist-none")
        assert reason in pg.inner_text("#dist-none") and pg.locator(".bar").count() == 0
        pg.select_option("#colour-by", "margin")  # the margin needs only the top-k probabilities: still offered
        assert "p1 − p2" in pg.inner_text("#colour-legend")
        assert not errors, errors
    finally:
        pg.close()
