"""The explorer in a real browser: Debian's Chromium driven by Playwright, against a server on a free port.

Numbers on the page are checked against the trace as pyarrow reads it (not through the explorer's own
queries). A failing test leaves a screenshot in its tmp dir. Without chromium or playwright these tests
skip, except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from moelab.explore.server import bind, serve_in_thread, url_of


@pytest.fixture(scope="module")
def site(explorer):
    server = bind(explorer, "127.0.0.1", 0)
    serve_in_thread(server)
    yield url_of(server)
    server.shutdown()
    server.server_close()


@pytest.fixture
def page(browser, site, tmp_path, request):
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(site)
    pg.wait_for_selector("#token-area .tok")
    yield pg
    failed = getattr(request.node, "rep_call", None)
    if failed is None or failed.failed:
        pg.screenshot(path=str(tmp_path / f"{request.node.name}.png"), full_page=True)
        print(f"screenshot: {tmp_path / (request.node.name + '.png')}")
    pg.close()
    assert not errors, errors


def rows_of(path, seq):
    """(pos, layer, rank) -> row of the trace, read with pyarrow: the reference for the page's numbers."""
    t = pq.read_table(path, filters=[("seq", "=", seq)]).to_pylist()
    return {(r["pos"], r["layer"], r["rank"]): r for r in t}


def test_path_panel_matches_trace(page, traces):
    assert page.inner_text("#doc-count") == "4 document(s)" and page.is_disabled("#doc-next")
    page.click("#doc-list button[data-doc='1']")
    page.wait_for_selector("#doc-list button.current[data-doc='1']")
    ref = rows_of(traces[0], 1)
    page.hover("#token-area .tok[data-i='3']")
    panel = page.locator("#path-panel")
    for layer in range(3):
        for rank in range(2):
            r = ref[(3, layer, rank)]
            cells = panel.locator(f"tr[data-layer='{layer}'] td[data-rank='{rank}']")
            assert cells.nth(0).get_attribute("data-expert") == str(r["expert"])
            assert cells.nth(1).inner_text() == ("dropped" if r["dropped"] else f"{r['weight']:.3f}")
            assert cells.nth(2).inner_text() == f"{r['prob']:.3f}"
    assert ref[(3, 0, 1)]["dropped"]  # the planted drop is the one shown


def test_layer_slider_and_keys_recolour_tokens(page, traces):
    ref = rows_of(traces[0], 0)

    def top1_on_page():
        return page.eval_on_selector_all("#token-area .tok", "els => els.map(e => +e.dataset.expert)")

    assert top1_on_page() == [ref[(p, 0, 0)]["expert"] for p in range(24)]
    page.fill("#layer-slider", "2")
    page.dispatch_event("#layer-slider", "input")
    assert page.inner_text("#layer-label") == "2"
    assert top1_on_page() == [ref[(p, 2, 0)]["expert"] for p in range(24)]
    assert set(top1_on_page()) == {3}  # planted: domain "code" goes to expert 3 at layer 2

    page.focus("#token-area .tok[data-i='0']")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.i") == "2"
    assert "pos 2 " in page.inner_text("#path-panel")
    page.keyboard.press("ArrowDown")
    assert page.inner_text("#layer-label") == "1"
    assert page.evaluate("document.activeElement.dataset.i") == "2"
    assert top1_on_page() == [ref[(p, 1, 0)]["expert"] for p in range(24)]
    assert page.locator("#legend .swatch").count() == 8
    assert page.locator("#token-area .tok[tabindex='0']").count() == 1  # one tab stop for the text
    page.keyboard.press("Enter")  # opens the focused token's top-1 expert at this layer
    page.wait_for_selector("#expert-title")
    assert page.inner_text("#expert-title").startswith(f"Layer 1, expert E{ref[(2, 1, 0)]['expert']}")


def test_keyboard_focus_ignores_a_resting_pointer(page, traces):
    """Issue 23.8: with the pointer resting on a token, a layer change re-drew the text under it and the
    path panel (and Enter) jumped to the token under the pointer."""
    ref = rows_of(traces[0], 0)
    page.hover("#token-area .tok[data-i='10']")
    page.focus("#token-area .tok[data-i='0']")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowUp")
    assert page.inner_text("#layer-label") == "1"
    page.wait_for_timeout(100)
    assert page.evaluate("document.activeElement.dataset.i") == "1"
    assert "pos 1 " in page.inner_text("#path-panel")
    page.keyboard.press("Enter")
    page.wait_for_selector("#expert-title")
    assert page.inner_text("#expert-title").startswith(f"Layer 1, expert E{ref[(1, 1, 0)]['expert']}")
    page.click("#tab-text")
    page.mouse.move(5, 5)
    page.hover("#token-area .tok[data-i='10']")  # a real pointer move still shows the token under it
    assert "pos 10 " in page.inner_text("#path-panel")


def test_expert_view_from_legend(page):
    page.fill("#layer-slider", "1")
    page.dispatch_event("#layer-slider", "input")
    page.click("#legend .swatch[data-expert='5']")
    page.wait_for_selector("#expert-title")
    assert page.is_visible("#view-expert")
    assert "Layer 1, expert" in page.inner_text("#expert-title")
    lift = page.locator("#expert-body table").nth(5)  # highest-lift tokens
    first = lift.locator("tbody tr").first
    assert "#7" in first.inner_text()  # planted: token 7 always goes to expert 5
    assert first.locator("td").nth(3).inner_text() == "100.0%"  # issue 23.8: it read 50.0% (1/K)
    assert "Null:" in page.inner_text("#expert-body")


def test_diff_view_highlights_planted_changes(page):
    page.click("#tab-diff")
    page.fill("#d-doc", "0")
    page.fill("#d-layer", "1")
    page.dispatch_event("#d-layer", "input")
    page.click("#d-open")
    page.wait_for_selector("#diff-tokens .tok")
    changed = page.eval_on_selector_all("#diff-tokens .tok.changed", "els => els.map(e => +e.dataset.i)")
    assert changed == [3, 5]
    page.fill("#d-layer", "0")
    page.dispatch_event("#d-layer", "input")
    assert page.locator("#diff-tokens .tok.changed").count() == 0
    page.hover("#diff-tokens .tok[data-i='3']")
    assert "A margin" in page.inner_text("#diff-panel")


def test_live_view_shows_the_models_routing(browser, traces, tmp_path):
    from moelab.data.tokenizer import train_tokenizer
    from moelab.explore.commands import build_explorer
    from moelab.model.config import ModelConfig, MoEConfig
    from moelab.model.transformer import build_model
    from moelab.train.checkpoint import save_checkpoint

    tok = train_tokenizer(["def f(x):\n    return x + 1\n", "The quick brown fox."] * 50, 400)
    tok_file = tok.save(tmp_path / "tokenizer.json")
    cfg = ModelConfig(vocab_size=400, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=64,
                      moe=MoEConfig(num_experts=8, top_k=2, moe_every=1, expert_hidden=16))
    model = build_model(cfg, seed=0)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, {"model": cfg.to_dict()}, step=1)
    server = bind(build_explorer([str(traces[0])], model=str(ckpt), tokenizer=str(tok_file)), "127.0.0.1", 0)
    serve_in_thread(server)
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        pg.goto(url_of(server))
        pg.wait_for_selector("#token-area .tok")
        pg.click("#tab-live")
        pg.type("#live-text", "def f(x): return x", delay=5)  # routed as it is typed, no click
        ids = tok.encode("def f(x): return x")
        want = [tok.decode([i]) for i in ids]
        pg.wait_for_function("want => JSON.stringify([...document.querySelectorAll('#live-tokens .tok')]"
                             ".map(e => e.textContent)) === JSON.stringify(want)", arg=want)
        assert pg.locator("#live-tokens .tok").count() == len(ids)
        assert pg.locator("#live-legend .swatch").count() == 8  # issue 23.9: a legend in the live view
        import torch

        routing = model(torch.tensor([ids]), return_routing=True).routing
        pg.hover("#live-tokens .tok[data-i='1']")
        for layer, r in enumerate(routing):
            cell = pg.locator(f"#live-panel tr[data-layer='{layer}'] td[data-rank='0']").first
            assert cell.get_attribute("data-expert") == str(int(r.expert_ids_TK[1, 0]))
    except Exception:
        pg.screenshot(path=str(tmp_path / "live.png"), full_page=True)
        raise
    finally:
        pg.close()
        server.shutdown()
        server.server_close()


MARKUP = ["<img src=x onerror=\"document.title='X';window.__pwned=1\">", "<script>window.__pwned=2</script>",
          "\"><svg onload=\"window.__pwned=3\">", "'><b id=injected>bold</b>", "<iframe src=javascript:1>"]


def test_markup_in_an_interventions_file_is_shown_as_text(browser, traces, tmp_path):
    """Issue 24.1: every value read from a file (block, numbers, the file's own name, the trace's block map)
    holds markup; the expert view must show it as text and create no element from it."""
    import json

    from moelab.explore.commands import build_explorer

    mark = "".join(MARKUP)
    iv = tmp_path / "<img id=fromname src=x onerror=window.__pwned=4>.json"
    iv.write_text(json.dumps({"tokens": 10, "ablation": [
        {"block": mark, "experts": [5], "all": {"block": mark, "mean": mark, "lo": mark, "hi": mark, "p": mark,
                                                 "p_holm": mark}}]}))
    app = build_explorer([str(traces[0])], interventions=[str(iv)])
    app.sources[0].meta.extra["moe_blocks"] = [mark, 3, 5]
    server = bind(app, "127.0.0.1", 0)
    serve_in_thread(server)
    pg = browser.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        pg.goto(url_of(server))
        pg.wait_for_selector("#token-area .tok")
        before = pg.evaluate("document.querySelectorAll('*').length - document.querySelectorAll('#expert-body *, #load-overview *').length")
        pg.evaluate("openExpert(0, 5)")
        pg.wait_for_selector("#ablation", timeout=60_000)
        body = pg.locator("#expert-body")
        assert pg.evaluate("window.__pwned") is None and pg.title() != "X"
        for tag in ("img", "script", "svg", "iframe", "#injected", "#fromname"):
            assert body.locator(tag).count() == 0, tag
        text = pg.locator("#ablation").inner_text()
        assert "<img src=x onerror=" in text and "<img id=fromname src=x onerror=window.__pwned=4>.json" in text, text
        after = pg.evaluate("document.querySelectorAll('*').length - document.querySelectorAll('#expert-body *, #load-overview *').length")
        assert after == before
        assert not errors, errors
    finally:
        pg.close()
        server.shutdown()
        server.server_close()


def test_rank_order_unknown_gets_no_rank0_colouring(browser, traces):
    """Issue 23.3: a trace whose metadata says rank order unknown (Megatron imports) colours no token by
    its first stored expert and says why; the same file without the flag is coloured (the reference)."""
    from moelab.explore.commands import build_explorer

    app = build_explorer([str(traces[0]), str(traces[1])])
    app.sources[1].meta.extra["rank_order"] = "unknown"
    server = bind(app, "127.0.0.1", 0)
    serve_in_thread(server)
    pg = browser.new_page()
    try:
        pg.goto(url_of(server))
        pg.wait_for_selector("#token-area .tok")
        coloured = "els => els.filter(e => e.style.background !== '').length"
        assert pg.eval_on_selector_all("#token-area .tok", coloured) == 24 and pg.is_hidden("#rank-note")
        pg.select_option("#trace-select", "1")
        pg.click("#doc-list button[data-doc='0']")
        pg.wait_for_selector("#rank-note:not([hidden])")
        assert pg.eval_on_selector_all("#token-area .tok", coloured) == 0
        assert "rank order is unknown" in pg.inner_text("#rank-note")
    finally:
        pg.close()
        server.shutdown()
        server.server_close()


def test_diff_view_shows_changed_drops(browser, traces, tmp_path):
    """Issue 23.8: two traces that differ only in which choices were dropped (capacity 2.0 vs 1.0) showed
    nothing. Trace c is trace a with one more drop planted at (seq 0, pos 7, layer 1, rank 1)."""
    import pyarrow as pa

    from moelab.explore.commands import build_explorer

    t = pq.read_table(traces[0]).to_pylist()
    for r in t:
        if (r["seq"], r["pos"], r["layer"], r["rank"]) == (0, 7, 1, 1):
            r["dropped"], r["weight"] = True, 0.0
    c = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(traces[0])), c)
    app = build_explorer([str(traces[0]), str(c)])
    server = bind(app, "127.0.0.1", 0)
    serve_in_thread(server)
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        pg.goto(url_of(server))
        pg.wait_for_selector("#token-area .tok")
        pg.click("#tab-diff")
        pg.fill("#d-doc", "0")
        pg.fill("#d-layer", "1")
        pg.dispatch_event("#d-layer", "input")
        pg.click("#d-open")
        pg.wait_for_selector("#diff-tokens .tok")
        changed = pg.eval_on_selector_all("#diff-tokens .tok.changed", "els => els.map(e => +e.dataset.i)")
        assert changed == [7]
        assert pg.eval_on_selector_all("#diff-tokens .tok.dropdiff", "els => els.map(e => +e.dataset.i)") == [7]
        # issue 23.9: a legend in the diff view, whose swatches are the colours the changed tokens wear
        swatch = pg.eval_on_selector_all("#diff-legend .swatch", "els => els.map(e => e.style.background)")
        assert len(swatch) == 8
        b_top1 = int(pg.get_attribute("#diff-tokens .tok[data-i='7']", "title").split("B: ")[1].split(",")[0])
        assert pg.eval_on_selector("#diff-tokens .tok[data-i='7']", "e => e.style.background") == swatch[b_top1]
        assert pg.locator("#diff-summary tr[data-layer='1'] td").nth(3).inner_text() == "1"
        pg.hover("#diff-tokens .tok[data-i='7']")
        assert "drops (A: none; B: " in pg.inner_text("#diff-panel")
        pg.fill("#d-layer", "0")
        pg.dispatch_event("#d-layer", "input")
        assert pg.locator("#diff-tokens .tok.changed").count() == 0  # the nothing case: other layers same
    finally:
        pg.close()
        server.shutdown()
        server.server_close()


def test_drop_strike_through_is_a_toggle(page):
    """Issue 23.8: the strike-through of dropped choices covered much of a capacity-limited text, always."""
    page.click("#doc-list button[data-doc='1']")
    page.wait_for_selector("#doc-list button.current[data-doc='1']")
    dropped = page.eval_on_selector_all("#token-area .tok.dropped", "els => els.map(e => +e.dataset.i)")
    assert dropped == [2, 3, 4, 5]  # planted: (seq 1, pos 2-5, layer 0, rank 1)
    line = "els => els.map(e => getComputedStyle(e).textDecorationLine)"
    assert set(page.eval_on_selector_all("#token-area .tok.dropped", line)) == {"none"}
    page.check("#show-drops")
    assert set(page.eval_on_selector_all("#token-area .tok.dropped", line)) == {"line-through"}
    assert set(page.eval_on_selector_all("#token-area .tok:not(.dropped)", line)) == {"none"}


def test_newline_tokens_are_visible_and_one_line_tall(browser, traces, tmp_path):
    """Issue 23.8: newline tokens rendered as slivers or empty blocks up to 84 px tall."""
    import pyarrow as pa

    from moelab.data.tokenizer import train_tokenizer
    from moelab.explore.commands import build_explorer

    tok = train_tokenizer(["def f(x):\n    return x\n\nclass A:\n    pass\n"] * 50, 400)
    tok_file = tok.save(tmp_path / "tokenizer.json")
    ids = (tok.encode("def f(x):\n    return x\n\nclass A:\n    pass\n") * 4)[:24]
    newline_at = [i for i, t in enumerate(ids) if "\n" in tok.decode([t])]
    assert newline_at
    t = pq.read_table(traces[0])
    col = [ids[p] for p in t["pos"].to_pylist()]
    pq.write_table(t.set_column(t.schema.get_field_index("token"), "token", pa.array(col, pa.int32())),
                   tmp_path / "nl.parquet")
    server = bind(build_explorer([str(tmp_path / "nl.parquet")], tokenizer=str(tok_file)), "127.0.0.1", 0)
    serve_in_thread(server)
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        pg.goto(url_of(server))
        pg.wait_for_selector("#token-area .tok")
        plain_h = pg.evaluate("document.querySelector('#token-area .tok:not(.nl)').getBoundingClientRect().height")
        for i in newline_at:
            rects = pg.evaluate(f"[...document.querySelector(\"#token-area .tok[data-i='{i}']\").getClientRects()]"
                                ".map(r => [r.width, r.height])")
            assert all(h <= plain_h + 1 for _, h in rects), (i, rects, plain_h)
            assert max(w for w, _ in rects) >= 6, (i, rects)  # the ↵ is there to see and to point at
            assert "↵" in pg.inner_text(f"#token-area .tok[data-i='{i}']")
    finally:
        pg.close()
        server.shutdown()
        server.server_close()


def test_a_failed_or_loading_view_does_not_show_the_previous_answer(page):
    """Issue 23.8: after an error (or while loading) the previous expert's tables stayed on screen."""
    page.fill("#layer-slider", "1")
    page.dispatch_event("#layer-slider", "input")
    page.click("#legend .swatch[data-expert='5']")
    page.wait_for_selector("#expert-title")
    release = []
    page.route("**/api/expert*", lambda route: release.append(route))  # hold the next answer
    page.fill("#x-expert", "6")
    page.click("#x-open")
    page.locator("#expert-body", has_text="loading").wait_for()
    assert page.locator("#expert-title").count() == 0
    release[0].continue_()
    page.unroute("**/api/expert*")
    page.wait_for_selector("#expert-title")
    assert "expert E6" in page.inner_text("#expert-title")
    page.fill("#x-layer", "9")
    page.click("#x-open")
    page.locator("#expert-body", has_text="error").wait_for()
    assert page.locator("#expert-title").count() == 0
    assert "layer 9 has no expert 6" in page.inner_text("#expert-body")


def test_the_first_16_expert_colours_are_distinguishable(page):
    """Issue 23.8: 3 of 16 expert colours were closer than CIEDE2000 5. The metric is checked on Sharma et
    al.'s published pairs first; the swatches' computed backgrounds are what is measured."""
    import itertools
    import re

    from tests.explore.ciede2000 import ciede2000, srgb_to_lab

    assert round(ciede2000((50, 2.6772, -79.7751), (50, 0, -82.7485)), 4) == 2.0425
    assert round(ciede2000((50, 2.5, 0), (73, 25, -18)), 4) == 27.1492
    colours = page.evaluate("[...Array(16).keys()].map(e => expertColor(e))")
    labs = [srgb_to_lab(c["bg"]) for c in colours]
    worst = min(ciede2000(a, b) for a, b in itertools.combinations(labs, 2))
    assert worst >= 10, worst
    shown = page.eval_on_selector_all("#legend .swatch", "els => els.map(e => getComputedStyle(e).backgroundColor)")
    as_hex = ["#%02X%02X%02X" % tuple(map(int, re.findall(r"\d+", s)[:3])) for s in shown]
    assert as_hex == [c["bg"] for c in colours[:len(shown)]]


def test_url_state_round_trip(page, browser, traces):
    """Issue 23.9: a view can be bookmarked: the address after choosing doc 2 at layer 2 (and then an
    expert) opens the same view in a fresh page; the colours checked against the trace."""
    ref = rows_of(traces[0], 2)
    page.click("#doc-list button[data-doc='2']")
    page.wait_for_selector("#doc-list button.current[data-doc='2']")
    page.fill("#layer-slider", "2")
    page.dispatch_event("#layer-slider", "input")
    text_url = page.url
    assert "doc=2" in text_url and "layer=2" in text_url
    page.click("#legend .swatch[data-expert='3']")
    page.wait_for_selector("#expert-title")
    expert_url = page.url
    fresh = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        fresh.goto(text_url)
        fresh.wait_for_selector("#doc-list button.current[data-doc='2']")
        assert fresh.inner_text("#layer-label") == "2"
        # The document list and the text are asked for together: either may come first.
        fresh.wait_for_function("n => document.querySelectorAll('#token-area .tok').length === n", arg=24)
        top1 = fresh.eval_on_selector_all("#token-area .tok", "els => els.map(e => +e.dataset.expert)")
        assert top1 == [ref[(p, 2, 0)]["expert"] for p in range(24)]
        fresh.goto("about:blank")
        fresh.goto(expert_url)
        fresh.wait_for_selector("#expert-title")
        assert fresh.inner_text("#expert-title").startswith("Layer 2, expert E3") and fresh.is_visible("#view-expert")
    finally:
        fresh.close()


def test_csv_export_equals_the_table(page):
    """Issue 23.9: each table of the expert view downloads as CSV holding exactly the cells shown."""
    import csv
    import io

    page.fill("#layer-slider", "1")
    page.dispatch_event("#layer-slider", "input")
    page.click("#legend .swatch[data-expert='5']")
    page.wait_for_selector("#expert-title")
    tables = page.locator("#expert-body table")
    assert page.locator("#expert-body button.csv").count() == tables.count() >= 6
    for i in (0, 3, 5):  # domain shares, co-activation, highest-lift tokens (contexts hold commas, quotes)
        with page.expect_download() as info:
            page.locator("#expert-body button.csv").nth(i).click()
        got = list(csv.reader(io.StringIO(open(info.value.path(), encoding="utf-8").read())))
        shown = tables.nth(i).evaluate("t => [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim()))")
        assert got == shown and len(got) > 1, (i, got[:3], shown[:3])


def test_paging_past_4096_tokens(browser, tmp_path):
    """Issue 23.9: a document longer than a page (4096 tokens) could not be read past its first page.
    One 5000-token sequence, one layer, top-1, expert = pos % 8 (planted)."""
    from moelab.explore.commands import build_explorer
    from moelab.explore.queries import MAX_DOC_TOKENS

    T = 5000
    server = bind(build_explorer([str(_one_layer_trace(tmp_path / "long.parquet", T, vocab=40))]), "127.0.0.1", 0)
    serve_in_thread(server)
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    top1 = "els => els.map(e => +e.dataset.expert)"
    try:
        pg.goto(url_of(server))
        pg.wait_for_selector("#token-area .tok")
        # the first 256 tokens are painted first, the rest of the page follows
        pg.locator(f"#token-area .tok[data-i='{MAX_DOC_TOKENS - 1}']").wait_for()
        assert pg.locator("#token-area .tok").count() == MAX_DOC_TOKENS and pg.is_visible("#tok-pager")
        assert pg.is_disabled("#tok-prev") and pg.is_enabled("#tok-next")
        # issue 23.9: the path panel stays in view while the long text scrolls under it
        pg.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        pg.hover("#token-area .tok[data-i='4000']")
        box = pg.evaluate("(() => { const r = document.getElementById('path-panel').getBoundingClientRect();"
                          " return [r.top, r.bottom, innerHeight]; })()")
        assert 0 <= box[0] < box[2] and "doc pos 4000" in pg.inner_text("#path-panel"), box
        pg.click("#tok-next")
        pg.wait_for_selector("#tok-prev:enabled")
        pg.locator("#tok-range", has_text=f"tokens {MAX_DOC_TOKENS}–{T - 1}").wait_for()
        assert pg.locator("#token-area .tok").count() == T - MAX_DOC_TOKENS and pg.is_disabled("#tok-next")
        assert pg.eval_on_selector_all("#token-area .tok", top1) == [p % 8 for p in range(MAX_DOC_TOKENS, T)]
        pg.hover("#token-area .tok[data-i='3']")
        assert f"doc pos {MAX_DOC_TOKENS + 3}" in pg.inner_text("#path-panel")
        pg.click("#tok-prev")
        pg.wait_for_selector("#tok-prev:disabled")
        pg.locator("#tok-range", has_text=f"tokens 0–{MAX_DOC_TOKENS - 1}").wait_for()
        assert pg.eval_on_selector_all("#token-area .tok", top1) == [p % 8 for p in range(MAX_DOC_TOKENS)]
    finally:
        pg.close()
        server.shutdown()
        server.server_close()


def test_load_overview_flags_dead_experts(browser, tmp_path):
    """Issue 23.9: the per-layer load overview, shares checked against counts from the planted routing;
    expert 7 of layer 0 is never chosen (dead), layer 1 is balanced (the nothing case: no dead expert)."""
    import numpy as np

    from moelab.explore.commands import build_explorer
    from moelab.trace.io import TraceWriter
    from moelab.trace.schema import TraceMeta

    T = 400
    pos = np.arange(T)
    e0, e1 = np.where(pos % 8 == 7, 6, pos % 8), pos % 8
    cols = {"seq": np.repeat(np.zeros(T, np.int64), 2), "pos": np.repeat(pos, 2), "token": np.repeat(pos % 40 + 1, 2),
            "layer": np.tile([0, 1], T), "rank": np.zeros(2 * T, np.int64),
            "expert": np.stack([e0, e1], 1).reshape(-1), "weight": np.ones(2 * T), "prob": np.full(2 * T, 0.5),
            "dropped": np.zeros(2 * T, bool)}
    with TraceWriter(tmp_path / "dead.parquet", TraceMeta(num_experts=[8, 8], top_k=1, source="moelab")) as w:
        w.write(cols)
    server = bind(build_explorer([str(tmp_path / "dead.parquet")]), "127.0.0.1", 0)
    serve_in_thread(server)
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        pg.goto(url_of(server))
        pg.wait_for_selector("#token-area .tok")
        pg.click("#legend .swatch[data-expert='0']")
        pg.wait_for_selector("table.load td.dead")
        for layer, experts in ((0, e0), (1, e1)):
            cells = pg.eval_on_selector_all(f"table.load tr[data-layer='{layer}'] td",
                                            "els => els.map(e => e.textContent)")
            want = ["dead" if (experts == e).sum() == 0 else f"{100 * (experts == e).sum() / T:.1f}%" for e in range(8)]
            assert cells == want, (layer, cells, want)
        assert pg.locator("table.load tr[data-layer='1'] td.dead").count() == 0
        pg.click("table.load tr[data-layer='1'] td[data-expert='4']")
        pg.wait_for_selector("#expert-title")
        pg.locator("#expert-title", has_text="Layer 1, expert E4").wait_for()
    finally:
        pg.close()
        server.shutdown()
        server.server_close()


def test_margin_colouring(page, traces):
    """Issue 23.9: colour by the router's margin (top-1 minus second probability), from the trace's probs."""
    ref = rows_of(traces[0], 0)
    page.select_option("#colour-by", "margin")
    margins = page.eval_on_selector_all("#token-area .tok", "els => els.map(e => +e.dataset.margin)")
    want = [ref[(p, 0, 0)]["prob"] - ref[(p, 0, 1)]["prob"] for p in range(24)]
    assert margins == pytest.approx(want, abs=1e-4)
    light = page.eval_on_selector_all("#token-area .tok", "els => els.map(e => e.style.background)")
    lo, hi = int(np.argmin(want)), int(np.argmax(want))
    assert light[lo] != light[hi]  # a near tie and a clear choice look different
    page.select_option("#colour-by", "expert")
    assert page.eval_on_selector_all("#token-area .tok", "els => els.map(e => +e.dataset.expert)") == \
        [ref[(p, 0, 0)]["expert"] for p in range(24)]


def test_svg_and_png_export_of_the_text_view(page):
    """Issue 23.9: the text view as a picture: the SVG holds one box per token, in the page's colours and
    with the page's text; the PNG is a PNG of the text area's size."""
    import struct
    import xml.etree.ElementTree as ET

    with page.expect_download() as info:
        page.click("#export-svg")
    svg = ET.parse(info.value.path()).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    groups = svg.findall(f"{ns}g")
    shown = page.eval_on_selector_all("#token-area .tok", "els => els.map(e => [e.textContent, getComputedStyle(e).backgroundColor])")
    assert len(groups) == len(shown) == 24
    assert [(g.find(f"{ns}text").text or "", g.find(f"{ns}rect").get("fill")) for g in groups] == [tuple(x) for x in shown]
    with page.expect_download() as info:
        page.click("#export-png")
    data = open(info.value.path(), "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    box = page.eval_on_selector("#token-area", "e => [e.getBoundingClientRect().width, e.getBoundingClientRect().height]")
    assert (w, h) == (int(-(-box[0] // 1)), int(-(-box[1] // 1)))


def test_a_late_answer_for_an_earlier_expert_does_not_replace_the_later_one(browser, tmp_path):
    """Issue 23.8 (stale results): open expert 0, then expert 4 while expert 0's answer is held back; when
    it arrives late the page must keep showing expert 4 (it used to show whichever answer came last)."""
    from moelab.explore.commands import build_explorer

    server = bind(build_explorer([str(_one_layer_trace(tmp_path / "t.parquet", 64, vocab=20))]), "127.0.0.1", 0)
    serve_in_thread(server)
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    held = []
    pg.route("**/api/expert?*expert=0*", lambda route: held.append(route))
    try:
        pg.goto(url_of(server))
        pg.wait_for_selector("#token-area .tok")
        pg.click("#legend .swatch[data-expert='0']")
        pg.wait_for_timeout(300)
        assert held, "the request for expert 0 was not made"
        pg.click("table.load tr[data-layer='0'] td[data-expert='4']")
        pg.locator("#expert-title", has_text="expert E4").wait_for()
        for route in held:
            route.continue_()
        pg.wait_for_timeout(1500)
        assert "expert E4" in pg.inner_text("#expert-title")
    finally:
        pg.close()
        server.shutdown()
        server.server_close()


def _one_layer_trace(path, T, vocab, token=None, expert=None):
    """One sequence of T tokens, one layer of 8 experts, top-1 cycling through the experts (or as given)."""
    from moelab.trace.io import TraceWriter
    from moelab.trace.schema import TraceMeta

    pos = np.arange(T)
    cols = {"seq": np.zeros(T, np.int64), "pos": pos, "token": pos % vocab + 1 if token is None else token,
            "layer": np.zeros(T, np.int64), "rank": np.zeros(T, np.int64),
            "expert": pos % 8 if expert is None else expert,
            "weight": np.ones(T), "prob": np.full(T, 0.5), "dropped": np.zeros(T, bool)}
    with TraceWriter(path, TraceMeta(num_experts=[8], top_k=1, source="moelab")) as w:
        w.write(cols)
    return path


def test_contexts_open_their_place_in_the_text_view(page, browser, traces):
    """Issue 23.9: an example context in the expert view opens that place in the text view: its document,
    the token focused (its path shown), the expert's layer; the address holds it (a fresh page opens it)."""
    rows = pq.read_table(traces[0]).to_pylist()
    first = sorted((r["seq"], r["pos"]) for r in rows if r["layer"] == 1 and r["expert"] == 5 and r["token"] == 7)
    page.fill("#layer-slider", "1")
    page.dispatch_event("#layer-slider", "input")
    page.click("#legend .swatch[data-expert='5']")
    page.wait_for_selector("#expert-title")
    links = page.locator("#expert-body a.ctx")
    assert links.count() >= 2
    places = links.evaluate_all("as => as.map(a => [+a.dataset.doc, +a.dataset.docPos])")
    assert places[:2] == [list(p) for p in first[:2]]  # token 7 (highest lift) comes first: doc = seq here
    for i in (0, 1):
        page.click("#tab-expert")
        links.nth(i).click()
        doc, at = places[i]
        page.wait_for_selector(f"#doc-list button.current[data-doc='{doc}']")
        page.wait_for_function("at => +(document.activeElement && document.activeElement.dataset.i) === at",
                               arg=at, timeout=10_000)  # a function, not an expression: the page's CSP forbids eval
        assert page.is_visible("#view-text") and page.inner_text("#layer-label") == "1"
        assert page.evaluate("+document.activeElement.dataset.i") == at  # one page: index = doc_pos
        panel = page.inner_text("#path-panel")
        assert f"seq {doc} · pos {at} " in panel and "token id 7 " in panel
        assert f"doc={doc}" in page.url and f"at={at}" in page.url and "layer=1" in page.url
    fresh = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        fresh.goto(page.url)
        fresh.wait_for_selector(f"#doc-list button.current[data-doc='{places[1][0]}']")
        # the document list can mark the document before its text is painted and the token focused
        fresh.wait_for_function("at => +(document.activeElement && document.activeElement.dataset.i) === at",
                                arg=places[1][1], timeout=10_000)
        assert fresh.evaluate("+document.activeElement.dataset.i") == places[1][1]
        assert f"pos {places[1][1]} " in fresh.inner_text("#path-panel")
    finally:
        fresh.close()


def test_a_context_past_the_first_page_opens_its_page(browser, tmp_path):
    """A context at position 4200 of a 5000-token document opens the page from 4096 with that token
    focused. Planted: token 99 only at positions 4200-4219, always expert 3 (the highest lift); the
    other tokens cycle over 41 ids against 8 experts (lift near 1)."""
    from moelab.explore.commands import build_explorer
    from moelab.explore.queries import MAX_DOC_TOKENS

    T = 5000
    pos = np.arange(T)
    token, expert = pos % 41 + 1, pos % 8
    token[4200:4220], expert[4200:4220] = 99, 3
    path = _one_layer_trace(tmp_path / "late.parquet", T, vocab=41, token=token, expert=expert)
    server = bind(build_explorer([str(path)]), "127.0.0.1", 0)
    serve_in_thread(server)
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        pg.goto(url_of(server) + "#view=expert&xl=0&xe=3")
        pg.wait_for_selector("#expert-title")
        link = pg.locator("#expert-body a.ctx").first
        assert (link.get_attribute("data-doc"), link.get_attribute("data-doc-pos")) == ("0", "4200")
        link.click()
        pg.wait_for_selector("#tok-prev:enabled")
        pg.locator("#tok-range", has_text=f"tokens {MAX_DOC_TOKENS}–{T - 1}").wait_for()
        assert pg.evaluate("+document.activeElement.dataset.i") == 4200 - MAX_DOC_TOKENS
        assert "doc pos 4200" in pg.inner_text("#path-panel") and "token id 99 " in pg.inner_text("#path-panel")
        assert f"start={MAX_DOC_TOKENS}" in pg.url and "at=4200" in pg.url
    finally:
        pg.close()
        server.shutdown()
        server.server_close()


def test_first_page_of_text_does_not_wait_for_the_document_list(browser, traces):
    """Issue 23.9 (first paint): the text of the first document is asked for beside the document list,
    not after it: with /api/docs held back, the tokens are painted (and match the trace)."""
    from moelab.explore.commands import build_explorer

    server = bind(build_explorer([str(traces[0])]), "127.0.0.1", 0)
    serve_in_thread(server)
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    held = []
    pg.route("**/api/docs?*", lambda route: held.append(route))
    try:
        pg.goto(url_of(server))
        pg.wait_for_selector("#token-area .tok")
        assert held and pg.locator("#doc-list button").count() == 0  # the list is still on its way
        ref = rows_of(traces[0], 0)
        top1 = pg.eval_on_selector_all("#token-area .tok", "els => els.map(e => +e.dataset.expert)")
        assert top1 == [ref[(p, 0, 0)]["expert"] for p in range(24)]
        for route in held:
            route.continue_()
        pg.wait_for_selector("#doc-list button.current[data-doc='0']")
    finally:
        pg.close()
        server.shutdown()
        server.server_close()
