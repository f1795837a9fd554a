"""Review (rev2): the path panel's router distribution when a token has it at some layers only (a trace
from another writer may leave `probs` null on a layer's rank-0 rows): the layers that have it are drawn,
the others say so, and nothing throws."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moelab.explore.commands import build_explorer
from moelab.explore.server import bind, serve_in_thread, url_of

_spec = importlib.util.spec_from_file_location("browser_dist", Path(__file__).with_name("test_browser_dist.py"))
bd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bd)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    path = bd.write(tmp_path_factory.mktemp("gap") / "gap.parquet", "full")
    table = pq.read_table(path)
    layer = table.column("layer").to_pylist()
    probs = [p if l == 0 else None for p, l in zip(table.column("probs").to_pylist(), layer)]  # layer 1: none
    i = table.schema.get_field_index("probs")
    pq.write_table(table.set_column(i, "probs", pa.array(probs, pa.list_(pa.float32()))), path)
    server = bind(build_explorer([str(path)]), "127.0.0.1", 0)
    serve_in_thread(server)
    yield url_of(server)
    server.shutdown()
    server.server_close()


def test_a_layer_without_a_stored_distribution_is_named_not_an_error(browser, site):
    pg, errors = bd.open_page(browser, site)
    try:
        pg.hover("#token-area .tok[data-i='3']")
        pg.wait_for_selector("#dist-box .dist, #dist-box .error")
        assert pg.locator("#dist-box .error").count() == 0, pg.inner_text("#dist-box")
        bars = pg.locator("#dist-box .dist[data-layer='0'] .bar")
        assert bars.evaluate_all("bs => bs.map(b => +b.dataset.p)") == pytest.approx(bd.dist(3, 0), abs=1e-6)
        assert pg.locator("#dist-box .dist[data-layer='1'] .bar").count() == 0
        assert "not stored" in pg.inner_text("#dist-box .dist[data-layer='1']")
        assert not errors, errors
    finally:
        pg.close()
