"""Review of the explorer's first-paint work (rev2): edge cases with a known answer."""

from __future__ import annotations

from moelab.explore.summary import ExpertSummary
from moelab.trace.io import open_trace


def test_an_index_never_built_says_so(traces):
    # the document index (`first`) fails: the routing index is never built, and must not read as built
    # (ready with no error), or a view taking it would count from ids_TLK = None
    t = open_trace(traces[0])

    def broken_docs():
        raise RuntimeError("the document index failed")

    s = ExpertSummary("(SELECT 1)", "tx", traces[0], t.meta.num_experts, t.meta.top_k, first=broken_docs).start()
    assert s.wait(60) and "document index failed" in s.error
    assert s.index.ready.is_set() and s.index.ids_TLK is None
    assert s.index.error is not None and "not built" in s.index.error


def test_index_counts_in_memory_bounded_by_tokens_not_sequences_times_labels(tmp_path):
    # 20,000 one-token sequences in 1,000 languages: a dense sequences x languages table is 20M cells (160 MB
    # a column); the pairs present are 20,000. Counts equal the direct SQL's, and the view's peak is small.
    import tracemalloc

    import duckdb
    import numpy as np
    import pyarrow.parquet as pq

    from moelab.explore import expert, queries
    from moelab.explore.index import RoutingIndex
    from moelab.trace.io import TraceWriter
    from moelab.trace.schema import TraceMeta

    S, E = 20_000, 4
    rng = np.random.default_rng(0)
    langs = [f"l{i}" for i in range(1000)]
    cols = {"seq": np.arange(S), "pos": 0, "token": rng.integers(0, 50, S), "layer": 0, "rank": 0,
            "expert": rng.integers(0, E, S), "weight": 1.0, "prob": 0.5,
            "domain": np.where(np.arange(S) % 3 == 0, "code", "web"), "lang": np.array(langs)[np.arange(S) % 1000]}
    path = tmp_path / "wide.parquet"
    with TraceWriter(path, TraceMeta(num_experts=[E], top_k=1)) as w:
        w.write(cols)
    index = RoutingIndex(path, [E], 1, True)
    index.build()
    assert index.error is None
    tracemalloc.start()
    try:
        got = index.counts(0, 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB for one view"
    sql = queries.source_sql(str(path), pq.ParquetFile(path).schema_arrow.names, [])
    ref = expert.direct(duckdb.connect().cursor(), sql, 0, 2)
    assert got == ref
    assert len(got.sums["lang"]) == 1000 and all(v[3] == 20 for v in got.sums["lang"].values())
