"""Trace diff: itself = full agreement; independent random routing = chance; refusals are one line."""

import numpy as np
import pytest

from moelab.cli import main
from moelab.config import MoelabError
from moelab.intervene.diff import chance_jaccard, diff_traces, margin_kk1, set_overlap
from moelab.trace.io import TraceWriter
from moelab.trace.schema import TraceMeta

L, E, K = 2, 8, 2


def write(path, ids_NLK, probs_NLE=None, tokens_N=None, seq_len=16):
    N = len(ids_NLK)
    Lx, Kx = ids_NLK.shape[1:]
    tokens_N = np.arange(N) % 50 if tokens_N is None else tokens_N
    rep = lambda a: np.repeat(a, Lx * Kx)  # noqa: E731
    seq, pos = np.arange(N) // seq_len, np.arange(N) % seq_len
    cols = {"seq": rep(seq), "pos": rep(pos), "doc_pos": rep(pos), "token": rep(tokens_N), "doc": rep(seq),
            "domain": rep(seq % 2), "domain.names": ["web", "code"], "lang": rep(np.zeros(N, int)),
            "lang.names": ["en"], "turn": rep(np.full(N, -1)),
            "layer": np.tile(np.repeat(np.arange(Lx), Kx), N), "block": np.tile(np.repeat(np.arange(Lx), Kx), N),
            "rank": np.tile(np.arange(Kx), N * Lx), "expert": ids_NLK.reshape(-1),
            "weight": np.full(N * Lx * Kx, 1.0 / Kx), "prob": np.full(N * Lx * Kx, 1.0 / Kx),
            "dropped": np.zeros(N * Lx * Kx, bool)}
    optional = []
    if probs_NLE is not None:
        cols["probs"] = probs_NLE.reshape(-1, probs_NLE.shape[-1])
        optional = ["probs"]
    meta = TraceMeta(num_experts=[E] * Lx, top_k=Kx, capacity_factor=None, model_config={"max_seq_len": seq_len})
    with TraceWriter(path, meta, optional=optional) as w:
        w.write(cols)
    return path


def random_routes(rng, N, Lx=L):
    probs = rng.dirichlet(np.ones(E), size=(N, Lx))
    return np.argsort(-probs, axis=-1, kind="stable")[..., :K], probs


def test_diff_with_itself_is_all_agreement(tmp_path):
    ids, probs = random_routes(np.random.default_rng(0), 320)
    a = write(tmp_path / "a.parquet", ids, probs)
    r = diff_traces(a, a)
    assert r["any_layer_differs"] == 0.0
    assert all(x["top1_agreement"] == 1.0 and x["jaccard"] == 1.0 and x["set_differs"] == 0 for x in r["layers"])
    assert all(v["flip_rate"] == 0 for v in r["layers"][0]["flips_by_margin"].values())


def test_diff_with_independent_random_routing_sits_at_chance(tmp_path):
    rng = np.random.default_rng(1)
    N = 16 * 400
    ids_a, probs_a = random_routes(rng, N)
    ids_b = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(N)])
    r = diff_traces(write(tmp_path / "a.parquet", ids_a, probs_a), write(tmp_path / "b.parquet", ids_b))
    chance = chance_jaccard(K, E)
    assert abs(chance - (0.5 / 3.5)) < 1e-12  # n=2, E=8: (4/8) / (4 - 4/8)
    for x in r["layers"]:
        assert abs(x["jaccard"] - chance) < 0.01 and abs(x["jaccard_permuted"] - chance) < 0.01
        assert abs(x["top1_agreement"] - 1 / E) < 0.015
    expected_any = 1 - (1 / 28) ** L  # a pair of sets agrees with probability 1 / C(8, 2) per layer
    assert abs(r["any_layer_differs"] - expected_any) < 0.01


def test_flips_follow_the_margin_when_b_reroutes_only_close_calls(tmp_path):
    rng = np.random.default_rng(2)
    ids_a, probs_a = random_routes(rng, 800)
    margin = margin_kk1(probs_a[:, 0], K)
    ids_b = ids_a.copy()
    close = margin < 0.02
    ids_b[close, 0, 1] = np.argsort(-probs_a[close, 0], axis=-1, kind="stable")[:, K]  # take the (k+1)-th
    r = diff_traces(write(tmp_path / "a.parquet", ids_a, probs_a), write(tmp_path / "b.parquet", ids_b))
    by = r["layers"][0]["flips_by_margin"]
    assert by["[0, 0.01)"]["flip_rate"] == 1.0 and by["[0.01, 0.02)"]["flip_rate"] == 1.0
    assert all(v["flip_rate"] == 0.0 for k, v in by.items() if k not in ("[0, 0.01)", "[0.01, 0.02)"))
    assert r["layers"][1]["set_differs"] == 0.0


def test_set_overlap_by_hand():
    inter, union = set_overlap(np.array([[0, 1], [2, 3]]), np.array([[1, 0], [3, 4]]), 5)
    assert inter.tolist() == [2, 1] and union.tolist() == [2, 3]


def test_refuses_other_tokens_or_layer_counts(tmp_path, capsys):
    rng = np.random.default_rng(3)
    ids, _ = random_routes(rng, 64)
    a = write(tmp_path / "a.parquet", ids)
    other_tokens = write(tmp_path / "b.parquet", ids, tokens_N=np.arange(64) % 7)
    fewer = write(tmp_path / "c.parquet", random_routes(rng, 64, Lx=3)[0])
    with pytest.raises(MoelabError, match="not of the same tokens"):
        diff_traces(a, other_tokens)
    assert main(["diff", str(a), str(fewer)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "2 and 3 MoE layers" in err
    assert main(["diff", str(a), str(tmp_path / "missing.parquet")]) == 2
    assert main(["diff", str(a), str(a), "--out", str(tmp_path / "d.json")]) == 0
    assert (tmp_path / "d.json").is_file()


def test_flips_vs_margin_figure_draws_one_line_per_layer(tmp_path):
    from moelab.report.intervene_section import flips_vs_margin

    ids, probs = random_routes(np.random.default_rng(5), 160)
    path = write(tmp_path / "a.parquet", ids, probs)
    fig = flips_vs_margin(diff_traces(path, path))
    lines = fig.axes[0].get_lines()
    assert len(lines) == L and all(set(line.get_ydata()) == {0.0} for line in lines)
    no_probs = write(tmp_path / "b.parquet", ids)
    assert flips_vs_margin(diff_traces(no_probs, no_probs)) is None


@pytest.mark.parametrize("batch_rows", [5, 7, 64])
def test_tokens_split_by_batch_boundaries_read_as_one_pass_reads_them(tmp_path, monkeypatch, batch_rows):
    """read_routes streams the trace, cutting each batch to whole tokens (L x K rows) and carrying the rest,
    probability rows with their rank-0 rows: batches of 5 and 7 rows split tokens and layers anywhere, and
    the diff equals the one read in a single batch."""
    from moelab.trace.io import Trace

    rng = np.random.default_rng(4)
    ids_a, probs_a = random_routes(rng, 96)
    ids_b, _ = random_routes(rng, 96)
    a, b = write(tmp_path / "a.parquet", ids_a, probs_a), write(tmp_path / "b.parquet", ids_b)
    whole = diff_traces(a, b)
    real = Trace.iter_batches
    monkeypatch.setattr(Trace, "iter_batches", lambda self, columns=None, batch_rows_=batch_rows, **k:
                        real(self, columns, batch_rows=batch_rows_, **k))
    assert diff_traces(a, b) == whole
    assert whole["layers"][0]["flips_by_margin"]
