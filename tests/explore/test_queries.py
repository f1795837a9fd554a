"""The explorer's answers against naive loops over the trace as pyarrow reads it (not through DuckDB)."""

from __future__ import annotations

import contextlib
import math
import threading
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest

from moelab.config import MoelabError
from moelab.explore import diff, expert
from moelab.explore.commands import build_explorer
from moelab.explore.index import RoutingIndex
from moelab.trace.io import TraceWriter, open_trace


CHANGED, SWAPPED, K, LAYERS, SEQ_LEN, SEQS, E = [(0, 3), (0, 5)], (1, 4), 2, 3, 24, 4, 8  # as conftest plants them


@pytest.fixture(scope="module", autouse=True)
def summaries_built(explorer):
    assert all(s.wait(60) and s.error is None for s in explorer.summaries)


@contextlib.contextmanager
def basis(ex, how: str):
    """The explorer answering as it does before its summaries are built: from the routing index
    ("index"), or where a trace allows none, from the trace's rows by SQL ("direct")."""
    summary = ex.summaries[0]
    ready, index = summary.ready, summary.index
    if how != "summary":
        summary.ready = threading.Event()
    if how == "direct":
        summary.index = RoutingIndex(index.path, [E] * LAYERS, K, True)
        summary.index.error = "refused for this test"
        summary.index.ready.set()
    try:
        yield
    finally:
        summary.ready, summary.index = ready, index


BASES = ["summary", "index", "direct"]


@pytest.fixture(scope="module")
def rows(traces):
    return pq.read_table(traces[0]).to_pylist()


def test_doc_routes_match_rows(explorer, rows):
    for doc in range(SEQS):
        got = explorer.doc({"doc": str(doc)})["tokens"]
        assert [t["pos"] for t in got] == list(range(SEQ_LEN))
        for r in (r for r in rows if r["seq"] == doc):
            t = got[r["pos"]]
            assert t["token"] == r["token"]
            assert t["experts"][r["layer"]][r["rank"]] == r["expert"]
            assert t["weights"][r["layer"]][r["rank"]] == pytest.approx(r["weight"])
            assert t["probs"][r["layer"]][r["rank"]] == pytest.approx(r["prob"])
            assert t["dropped"][r["layer"]][r["rank"]] == r["dropped"]
    assert explorer.doc({"doc": "99"})["tokens"] == []  # no such document: nothing, not an error


def test_document_filters(explorer, rows):
    assert explorer.docs({})["total"] == SEQS
    assert [d["doc"] for d in explorer.docs({"domain": "code"})["docs"]] == [0, 2]
    assert [d["doc"] for d in explorer.docs({"domain": "code", "lang": "de"})["docs"]] == [2]
    page = explorer.docs({"offset": "2"})
    assert page["total"] == SEQS and [d["doc"] for d in page["docs"]] == [2, 3]
    assert explorer.docs({"turn": "0"})["total"] == 0  # no turns in this trace
    assert explorer.docs({"turn": "-1"})["total"] == SEQS
    by_seq = defaultdict(list)
    for r in rows:
        if r["layer"] == 0 and r["rank"] == 0:
            by_seq[r["seq"]].append(r["token"])
    searched = 0
    for s, toks in sorted(by_seq.items()):
        for wanted in (toks[3:4], toks[5:7], toks[10:13], [toks[2], toks[4]]):  # the last: not in a row
            have = {q for q, ts in by_seq.items()
                    if any(ts[i:i + len(wanted)] == wanted for i in range(len(ts)))}
            got = {d["doc"] for d in explorer.docs({"q": " ".join(f"#{t}" for t in wanted)})["docs"]}
            assert got == have
            searched += len(have) < SEQS
    assert searched  # some searches single documents out
    assert explorer.docs({"q": "#1000"})["total"] == 0
    assert explorer.docs({"q": f"#{by_seq[0][1]} #{by_seq[0][0]}"})["total"] == len(
        {q for q, ts in by_seq.items() if any(ts[i:i + 2] == by_seq[0][1::-1] for i in range(len(ts)))})
    with pytest.raises(MoelabError, match="tokenizer"):
        explorer.docs({"q": "def"})


def naive_shares(rows, layer, e, key):
    n, k = Counter(), Counter()
    for r in rows:
        if r["layer"] == layer:
            g = key(r)
            n[g] += 1
            k[g] += r["expert"] == e
    return n, k


@pytest.mark.parametrize("how", BASES)
@pytest.mark.parametrize("layer,e", [(2, 3), (1, 5), (0, 0)])
def test_expert_load_by_label_and_its_null(explorer, rows, layer, e, how):
    with basis(explorer, how):
        got = explorer.expert({"layer": str(layer), "expert": str(e)})
    assert got["basis"] == how
    total = sum(1 for r in rows if r["layer"] == layer)
    count = sum(1 for r in rows if r["layer"] == layer and r["expert"] == e)
    assert (got["rows"], got["count"]) == (total, count)
    p = count / total
    bucket = lambda r: f"pos {4 ** int(math.log2(r['pos'] + 1) // 2) - 1}-{4 ** (int(math.log2(r['pos'] + 1) // 2) + 1) - 2}"  # noqa: E731
    for name, key in (("domain", lambda r: r["domain"]), ("lang", lambda r: r["lang"]), ("position", bucket)):
        n, k = naive_shares(rows, layer, e, key)
        assert {r["group"] for r in got["by"][name]} == set(n)
        for r in got["by"][name]:
            g = r["group"]
            assert (r["rows"], r["count"]) == (n[g], k[g])
            assert r["share"] == pytest.approx(k[g] / n[g]) and r["null"] == pytest.approx(p)
            sd = math.sqrt(p * (1 - p) * (total - n[g]) / ((total - 1) * n[g]))
            assert r["null_lo"] == pytest.approx(max(0, p - 1.96 * sd))
    for name, key in (("domain", lambda r: r["domain"]), ("lang", lambda r: r["lang"]), ("position", bucket)):
        for r in got["by"][name]:  # the share's interval over sequences, from per-sequence counts
            k_s, n_s = Counter(), Counter()
            for row in rows:
                if row["layer"] == layer and key(row) == r["group"]:
                    n_s[row["seq"]] += 1
                    k_s[row["seq"]] += row["expert"] == e
            S, share = len(n_s), r["share"]
            ss = sum((k_s[s] - share * n_s[s]) ** 2 for s in n_s)
            se = math.sqrt(S / (S - 1) * ss) / sum(n_s.values())
            assert r["share_lo"] == pytest.approx(max(0, share - 1.96 * se))
            assert r["share_hi"] == pytest.approx(min(1, share + 1.96 * se))
    if (layer, e) == (2, 3):  # planted: every "code" token has expert 3 among its two choices
        code = next(r for r in got["by"]["domain"] if r["group"] == "code")
        assert code["share"] == 0.5 and code["outside"]


def test_null_case_gives_lift_one(tmp_path, traces):
    """Two domains with identical routing: every share equals the null, nothing is flagged."""
    t = pq.read_table(traces[0], filters=[("seq", "=", 0)]).to_pydict()
    n = len(t["seq"])
    cols = {c: t[c] * 2 for c in ("pos", "token", "layer", "rank", "expert", "weight", "prob", "dropped")}
    cols.update(seq=[0] * n + [1] * n, domain=["code"] * n + ["web"] * n)
    with TraceWriter(tmp_path / "same.parquet", open_trace(traces[0]).meta) as w:
        w.write(cols)
    ex = build_explorer([str(tmp_path / "same.parquet")])
    ex.summaries[0].wait()
    for e in range(8):
        for r in ex.expert({"layer": "2", "expert": str(e)})["by"]["domain"]:
            assert r["share"] == pytest.approx(r["null"]) and not r["outside"]
            assert r["lift"] in (None, pytest.approx(1.0))


@pytest.mark.parametrize("how", BASES)
def test_token_stats_and_contexts(explorer, rows, how):
    with basis(explorer, how):
        got = explorer.expert({"layer": "1", "expert": "5"})
    assert got["basis"] == how
    n, k = Counter(), Counter()
    for r in rows:
        if r["layer"] == 1:
            n[r["token"]] += 1
            k[r["token"]] += r["expert"] == 5
    p = sum(k.values()) / sum(n.values())
    for r in got["tokens"]["frequent"] + got["tokens"]["lift"]:
        assert (r["rows"], r["count"]) == (n[r["token"]], k[r["token"]])
        assert r["lift"] == pytest.approx(k[r["token"]] / n[r["token"]] / p)
        occurrences = len({(x["seq"], x["pos"]) for x in rows if x["layer"] == 1 and x["token"] == r["token"]})
        assert r["occurrences"] == occurrences and r["share"] == pytest.approx(k[r["token"]] / occurrences)
    seven = next(r for r in got["tokens"]["lift"] if r["token"] == 7)
    assert seven["share"] == 1.0  # planted: token 7 always goes to expert 5 at layer 1 (issue 23.8: read 1/K)
    assert max(k.values()) == got["tokens"]["frequent"][0]["count"]
    eligible = [v for v in n if n[v] >= expert.MIN_TOKEN_COUNT and k[v]]
    assert got["tokens"]["lift"][0]["token"] == 7 == max(eligible, key=lambda v: k[v] / n[v])
    by_pos = {(r["seq"], r["pos"]): r["token"] for r in rows}
    first = sorted((r["seq"], r["pos"]) for r in rows if r["layer"] == 1 and r["expert"] == 5 and r["token"] == 7)
    assert [(c["seq"], c["pos"]) for c in got["contexts"]["7"]] == first[:expert.CONTEXTS_PER_TOKEN]
    for c in got["contexts"]["7"]:
        assert c["ids"][c["at"]] == 7
        assert (c["doc"], c["doc_pos"]) == (c["seq"], c["pos"])  # conftest: doc = seq, doc_pos = pos
        lo = c["pos"] - c["at"]
        assert c["ids"] == [by_pos[(c["seq"], q)] for q in range(lo, lo + len(c["ids"]))]


@pytest.mark.parametrize("how", BASES)
def test_coactivation_matches_loop(explorer, rows, how):
    for layer, e in ((1, 5), (0, 2)):
        sets = defaultdict(set)
        for r in rows:
            if r["layer"] == layer:
                sets[(r["seq"], r["pos"])].add(r["expert"])
        together = Counter(j for s in sets.values() if e in s for j in s if j != e)
        load = Counter(r["expert"] for r in rows if r["layer"] == layer)
        with basis(explorer, how):
            got = {r["expert"]: r for r in explorer.expert({"layer": str(layer), "expert": str(e)})["coactivation"]}
        for j, r in got.items():
            assert r["count"] == together[j]
            want = load[e] * (K - 1) * load[j] / (sum(load.values()) - load[e])
            assert r["expected"] == pytest.approx(want)


def test_diff_finds_planted_changes_and_nothing_in_a_self_diff(explorer):
    changed = set()
    for doc in range(SEQS):
        d = explorer.diff({"a": "0", "b": "1", "doc": str(doc)})
        probs = [t["probs"] for t in explorer.doc({"doc": str(doc)})["tokens"]]
        for t in d["tokens"]:
            for l, x in enumerate(t["layers"]):
                if x["changed"]:
                    changed.add((t["seq"], t["pos"], l, x["set_changed"], x["top1_changed"]))
                assert x["margin_a"] == pytest.approx(probs[t["pos"]][l][0] - probs[t["pos"]][l][1])
        same = explorer.diff({"a": "0", "b": "0", "doc": str(doc)})
        assert all(s["changed"] == 0 for s in same["summary"])
    assert changed == {(s, p, 1, True, True) for s, p in CHANGED} | {(*SWAPPED, 1, False, True)}


def test_diff_refuses_different_tokens():
    a = {"doc": 0, "tokens": [{"seq": 0, "pos": 0, "token": 1, "experts": [[0, 1]], "probs": [[0.5, 0.2]]}]}
    b = {"doc": 0, "tokens": [{"seq": 0, "pos": 0, "token": 2, "experts": [[0, 1]], "probs": [[0.5, 0.2]]}]}
    with pytest.raises(MoelabError, match="not the same tokens"):
        diff.diff_routes(a, b, 1)
    assert diff.margin([0.5, None]) is None and diff.margin([0.7]) is None
    assert diff.margin([0.6, 0.25]) == pytest.approx(0.35)
    assert LAYERS == 3


def test_document_spanning_sequences_and_defaulted_columns(tmp_path, traces):
    """doc = seq // 2 (two sequences per document); a file with only the required columns reads too."""
    t = pq.read_table(traces[0]).to_pydict()
    cols = {c: t[c] for c in ("seq", "pos", "token", "layer", "rank", "expert", "weight", "prob")}
    cols["doc"] = [s // 2 for s in t["seq"]]
    with TraceWriter(tmp_path / "packed.parquet", open_trace(traces[0]).meta) as w:
        w.write(cols)
    ex = build_explorer([str(tmp_path / "packed.parquet")])
    assert [d["doc"] for d in ex.docs({})["docs"]] == [0, 1]
    got = ex.doc({"doc": "1"})["tokens"]
    assert [(x["seq"], x["pos"]) for x in got] == [(s, p) for s in (2, 3) for p in range(SEQ_LEN)]
    assert [x["token"] for x in got] == [t["token"][i] for i in range(len(t["seq"]))
                                         if t["seq"][i] in (2, 3) and t["layer"][i] == 0 and t["rank"][i] == 0]
    import pyarrow as pa
    bare = pa.table({c: t[c] for c in ("seq", "pos", "layer", "rank", "expert")} |
                    {c: pa.nulls(len(t["seq"])) for c in ("token", "weight", "prob")})  # Arrow null type
    pq.write_table(bare, tmp_path / "bare.parquet")
    ex = build_explorer([str(tmp_path / "bare.parquet")])
    doc = ex.doc({"doc": "0"})["tokens"]
    assert doc[0]["token"] is None and doc[0]["probs"][0] == [None, None] and doc[0]["dropped"][0] == [False, False]
    assert ex.docs({})["domains"] == ["unknown"]
    ex.summaries[0].wait()
    got = ex.expert({"layer": "0", "expert": "1"})
    assert got["tokens"] == {"frequent": [], "lift": []} and got["by"]["domain"][0]["group"] == "unknown"


def test_expert_view_before_the_summaries_equals_the_summaries(explorer):
    """Issue 23.9: the first expert view no longer waits for the summary pass; its answer from the routing
    index, or from the trace's rows, is the summaries' answer, number for number, for every expert."""
    for layer in range(LAYERS):
        for e in range(E):
            answers = {}
            for how in BASES:
                with basis(explorer, how):
                    got = explorer.expert({"layer": str(layer), "expert": str(e)})
                assert got.pop("basis") == how
                got.pop("progress", None)
                answers[how] = got
            assert answers["index"] == answers["summary"] == answers["direct"]


def test_routing_index_refuses_a_trace_laid_out_otherwise(tmp_path, traces):
    """A trace whose rows are not every token's layers and ranks in order gets no index: the view then
    answers from the trace's rows (the direct SQL), still equal to a count over the rows."""
    t = pq.read_table(traces[0])
    keep = [i for i, (l, s) in enumerate(zip(t["layer"].to_pylist(), t["seq"].to_pylist())) if not (s == 3 and l == 2)]
    pq.write_table(t.take(keep), tmp_path / "gap.parquet")  # sequence 3 lacks layer 2
    ex = build_explorer([str(tmp_path / "gap.parquet")])
    ex.summaries[0].index.ready.wait(60)
    assert "in order" in ex.summaries[0].index.error
    with basis(ex, "index"):  # the index failed: the view falls back to the direct SQL
        got = ex.expert({"layer": "2", "expert": "3"})
    assert got["basis"] == "direct"
    rows = t.take(keep).to_pylist()
    assert got["rows"] == sum(r["layer"] == 2 for r in rows) == (SEQS - 1) * SEQ_LEN * K
    assert got["count"] == sum(r["layer"] == 2 and r["expert"] == 3 for r in rows)


def test_pair_counts_refuse_rows_out_of_order(tmp_path, traces):
    from moelab.explore.summary import pair_counts

    t = pq.read_table(traces[0])
    order = list(range(t.num_rows))
    order[0], order[1] = order[1], order[0]  # rank 1 before rank 0 in the first (token, layer)
    pq.write_table(t.take(order), tmp_path / "swapped.parquet")
    with pytest.raises(MoelabError, match="in order"):
        pair_counts(tmp_path / "swapped.parquet", [8, 8, 8], 2)


def test_one_file_opened_twice_shares_its_index_and_summaries(traces):
    ex = build_explorer([str(traces[0]), str(traces[0])])
    assert ex.sources[1].twin is ex.sources[0] and ex.summaries[0] is ex.summaries[1]
    assert ex.docs({"trace": "1"})["total"] == SEQS
    d = ex.diff({"a": "0", "b": "1", "doc": "2"})
    assert len(d["tokens"]) == SEQ_LEN and all(s["changed"] == 0 for s in d["summary"])


def test_a_page_of_text_before_the_document_index_and_in_parts(traces):
    """Issue 23.9 (first paint): a document's routes are served before the document index is built (its
    sequences found by a query on `doc`), equal to those served after; `limit` gives a page in parts."""
    ex = build_explorer([str(traces[0])])
    src = ex.sources[0]
    with src._lock:  # the background pass cannot build the index meanwhile
        src._docs, src._seq_range = None, {}
        early = [ex.doc({"doc": str(d)}) for d in range(SEQS)]
        parts = [ex.doc({"doc": "2", "limit": "10"}), ex.doc({"doc": "2", "start": "10", "limit": "100"})]
    assert ex.docs({})["total"] == SEQS
    late = [ex.doc({"doc": str(d)}) for d in range(SEQS)]
    assert src._docs is not None and early == late
    assert ex.info()["traces"][0]["first_doc"] == 0
    assert parts[0]["truncated"] and not parts[1]["truncated"]
    assert parts[0]["tokens"] + parts[1]["tokens"] == late[2]["tokens"]
    for bad in ("0", "4097", "-1", "x"):
        with pytest.raises(MoelabError, match="limit"):
            ex.doc({"doc": "0", "limit": bad})


def test_load_overview_is_the_same_before_the_summaries(explorer, rows):
    """The load overview from the routing index and from one SQL count equals the summaries' and a count
    over the rows."""
    answers = {}
    for how in BASES:
        with basis(explorer, how):
            answers[how] = explorer.load({})
    assert answers["summary"] == answers["index"] == answers["direct"]
    for layer in answers["summary"]["layers"]:
        want = Counter(r["expert"] for r in rows if r["layer"] == layer["layer"])
        assert [x["count"] for x in layer["experts"]] == [want[e] for e in range(E)]


def test_routing_index_refuses_past_its_memory_bound(traces, monkeypatch):
    """No index past MAX_BYTES of estimated memory (a top-1 trace of 100M rows would need 4 GiB): the
    expert view then answers by SQL."""
    import moelab.explore.index as index

    monkeypatch.setattr(index, "MAX_BYTES", 1000)
    ex = build_explorer([str(traces[0])])
    ex.summaries[0].index.ready.wait(60)
    assert "GiB" in ex.summaries[0].index.error
    with basis(ex, "index"):
        assert ex.expert({"layer": "1", "expert": "5"})["basis"] == "direct"
