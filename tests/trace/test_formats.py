"""Other tools' traces in and out: router-replay arrays, OLMoE's routing JSONL and Megatron-LM's RouterTracer
JSONL, each written here the way its tool writes it, imported, checked row by row against the ids that
went in, and exported back to replay arrays (round trip); bad input is one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from moelab.analysis.synthetic import planted_batches
from moelab.cli import main
from moelab.config import MoelabError
from moelab.trace.formats import import_trace
from moelab.trace.formats.replay import trace_to_replay
from moelab.trace.io import TraceWriter, open_trace
from moelab.trace.schema import TraceMeta

ROUTING = ["seq", "pos", "layer", "block", "rank", "expert"]


def read(trace, columns):
    got = list(trace.iter_batches(columns=columns))
    return {c: np.concatenate([b[c] for b in got]) for c in columns}


def planted_trace(path, num_seqs=3, seq_len=10):
    meta = TraceMeta(num_experts=[8, 8, 8], top_k=2)
    with TraceWriter(path, meta) as w:
        for b in planted_batches(num_seqs=num_seqs, seq_len=seq_len, num_layers=3, num_experts=8, top_k=2):
            w.write(b)
    return open_trace(path)


def expected_rows(ids_STLK, tokens_ST=None, keep=None, blocks=None):
    """The rows a trace must hold for per-sequence (T, L, K) ids: a plain loop, the oracle. `keep`: the
    source layers that are MoE layers; `blocks`: their block numbers (default: their source index)."""
    rows = {c: [] for c in ROUTING + ["token"]}
    for s, ids in enumerate(ids_STLK):
        for t in range(ids.shape[0]):
            if (ids[t] < 0).all():
                continue
            for li, l in enumerate(keep if keep is not None else range(ids.shape[1])):
                block = l if blocks is None else blocks[li]
                for r in range(ids.shape[2]):
                    for c, v in zip(ROUTING, (s, t, li, block, r, ids[t, l, r])):
                        rows[c].append(v)
                    rows["token"].append(-1 if tokens_ST is None else tokens_ST[s][t])
    return {c: np.array(v) for c, v in rows.items()}


def assert_rows(trace, want, with_tokens):
    got = read(trace, ROUTING + (["token"] if with_tokens else []))
    for c in ROUTING + (["token"] if with_tokens else []):
        np.testing.assert_array_equal(got[c], want[c], err_msg=c)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_replay_round_trip(tmp_path, capsys, suffix):
    trace = planted_trace(tmp_path / "t.parquet")
    original = read(trace, ROUTING + ["token"])
    rep = tmp_path / f"r{suffix}"
    code, out, _ = run_cli(capsys, "trace", "export", trace.path, "--format", "replay", "--out", rep)
    assert code == 0 and "exported 3 sequences (30 routed tokens)" in out
    code, out, _ = run_cli(capsys, "trace", "import", "replay", rep, "--out", tmp_path / "back.parquet")
    assert code == 0 and "column 'prob' is null" in out
    back = open_trace(tmp_path / "back.parquet")
    assert back.meta.num_experts == [8, 8, 8] and back.meta.top_k == 2 and back.meta.source == "import:replay"
    for c in ROUTING:
        want = original["layer"] if c == "block" and suffix == ".npy" else original[c]
        np.testing.assert_array_equal(read(back, [c])[c], want, err_msg=c)
    if suffix == ".safetensors":  # token ids and layer blocks travel with the packed file
        np.testing.assert_array_equal(read(back, ["token"])["token"], original["token"])
    else:  # a bare array: its layer axis is all there is
        assert "token" in back.null_columns
    assert set(back.null_columns) >= {"prob", "weight"}


def test_replay_without_the_last_token(tmp_path):
    trace = planted_trace(tmp_path / "t.parquet")
    main(["trace", "export", str(trace.path), "--format", "replay", "--out", str(tmp_path / "r.safetensors"),
          "--without-last-token"])
    rep = trace_to_replay(trace.path)
    import_trace("replay", tmp_path / "r.safetensors", tmp_path / "b.parquet")
    want = expected_rows([ids[:-1] for ids in rep["ids"]], [tok[:-1] for tok in rep["tokens"]],
                         blocks=rep["blocks"][0])
    assert_rows(open_trace(tmp_path / "b.parquet"), want, with_tokens=True)


def test_replay_as_an_engine_writes_it(tmp_path):
    """vLLM-style: one sequence, int32 (T - 1, L, K), input_ids of T; a dense layer all -1; a skipped token."""
    rng = np.random.default_rng(0)
    T, L, K, E = 9, 4, 2, 6
    ids = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(T - 1)]).astype(np.int32)
    ids[:, 0] = -1  # layer 0 is dense: no routing
    ids[3] = -1  # a token the engine did not record
    tokens = rng.integers(0, 1000, T).astype(np.int64)
    save_file({"routed_experts": ids, "input_ids": tokens}, str(tmp_path / "v.safetensors"))
    stats = import_trace("replay", tmp_path / "v.safetensors", tmp_path / "v.parquet", num_experts=E)
    assert any("[0] route no token" in n for n in stats["notes"])
    trace = open_trace(tmp_path / "v.parquet")
    assert trace.meta.num_experts == [E] * 3
    assert_rows(trace, expected_rows([ids], [tokens], keep=[1, 2, 3]), with_tokens=True)


def test_olmoe_jsonl_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    T, L, K, E = 12, 3, 4, 16
    lines, want_ids, want_tok = [], [], []
    for _ in range(2):
        router_logits = [rng.normal(size=(T, E)) for _ in range(L)]  # as output_router_logits gives them
        exp_ids = np.stack([np.argsort(-lg, -1)[:, :K].tolist() for lg in router_logits], -1)  # (T, K, L)
        input_ids = rng.integers(0, 50000, T).tolist()
        lines.append(json.dumps({"input_ids": input_ids, "predicted_token_ids": input_ids,
                                 "exp_ids": exp_ids.tolist()}))
        want_ids.append(exp_ids.transpose(0, 2, 1))
        want_tok.append(input_ids)
    (tmp_path / "c4_results.jsonl").write_text("\n".join(lines) + "\n")
    import_trace("olmoe", tmp_path / "c4_results.jsonl", tmp_path / "o.parquet", num_experts=E)
    trace = open_trace(tmp_path / "o.parquet")
    assert trace.meta.num_experts == [E] * L and trace.meta.top_k == K
    assert_rows(trace, expected_rows(want_ids, want_tok), with_tokens=True)
    rep = trace_to_replay(trace.path)  # and out again
    for got, want in zip(rep["ids"], want_ids):
        np.testing.assert_array_equal(got, want)


def megatron_records(ids_LTK, step, layers, mtp=False):
    recs = [{"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": int(l), "rank": 0,
             "num_tokens": int(ids.shape[0]), "topk": int(ids.shape[1]), "top_indices": ids.tolist()}
            for l, ids in zip(layers, ids_LTK)]
    if mtp:
        recs.append(dict(recs[0], block="mtp", mtp_idx=0, layer=0))
    return [json.dumps(r) for r in recs]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    from moelab.data.build import build_corpus
    from moelab.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("formats")
    tok = train_tokenizer(["def f(x):\n    return x + 1\n", "The quick brown fox."] * 50, 400)
    build_corpus(root / "corpus", ["python-docs"], tokenizer=tok, max_bytes_per_source=8000)
    return root / "corpus"


def test_megatron_router_trace(tmp_path, corpus_dir):
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus

    rng = np.random.default_rng(2)
    S, B, K, E, layers = 5, 2, 2, 8, [1, 3, 5]  # MoE layers of a hybrid model are not adjacent
    steps = [np.stack([np.stack([rng.permutation(E)[:K] for _ in range(S * B)]) for _ in layers]) for _ in range(2)]
    lines = sum((megatron_records(ids, step, layers, mtp=True) for step, ids in enumerate(steps)), [])
    (tmp_path / "router_trace_rank0.jsonl").write_text("\n".join(lines) + "\n")
    stats = import_trace("megatron", tmp_path, tmp_path / "m.parquet", corpus=corpus_dir, micro_batch=B)
    assert any("2 multi-token-prediction" in n for n in stats["notes"])
    # token t of a router call is position t // B of micro-batch row t % B ([s, b] flattened)
    want_ids = [ids.transpose(1, 0, 2).reshape(S, B, len(layers), K)[:, b] for ids in steps for b in range(B)]
    ref = next(iter_sequential(load_corpus(corpus_dir), seq_len=S, batch_size=4, split="heldout"))
    want = expected_rows(want_ids, ref["input_ids"].numpy(), blocks=layers)
    trace = open_trace(tmp_path / "m.parquet")
    assert trace.meta.num_experts == [E] * 3 and trace.meta.source == "import:megatron"
    assert_rows(trace, want, with_tokens=True)
    rep = trace_to_replay(trace.path)  # and out again, as the RouterReplay layout
    for got, ids in zip(rep["ids"], want_ids):
        np.testing.assert_array_equal(got, ids)
    no_tokens = import_trace("megatron", tmp_path / "router_trace_rank0.jsonl", tmp_path / "n.parquet")
    assert "token" in open_trace(tmp_path / "n.parquet").null_columns and no_tokens["tokens"] == 2 * S * B


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "float.npy", np.zeros((3, 2, 2)))
    np.save(tmp_path / "partial.npy", np.array([[[0, -1]], [[1, 2]]], np.int32))
    np.save(tmp_path / "dup.npy", np.array([[[1, 1]]], np.int32))
    (tmp_path / "bad.jsonl").write_text('{"step": 0, "layer": 1, "num_tokens": 2, "top_indices": [[1, 2]]}\n')
    (tmp_path / "notjson.jsonl").write_text("{oops\n")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    cases = [
        (["replay", tmp_path / "missing.npy"], "replay file not found"),
        (["replay", tmp_path / "obj.npy"], "without pickled objects"),
        (["replay", tmp_path / "float.npy"], "expected integer expert ids"),
        (["replay", tmp_path / "partial.npy"], "token 0 has -1 in some of its expert slots"),
        (["replay", tmp_path / "dup.npy"], "same expert twice"),
        (["replay", tmp_path / "junk.safetensors"], "not a readable safetensors file"),
        (["replay", tmp_path / "partial.npy", "--num-experts", "2"], "does not hold the source's expert 2"),
        (["megatron", tmp_path / "bad.jsonl"], "top_indices has shape \\(1, 2\\), but num_tokens=2"),
        (["megatron", tmp_path / "notjson.jsonl"], "line 1 is not valid JSON"),
        (["megatron", tmp_path], "no router_trace_rank\\*.jsonl files"),
        (["olmoe", tmp_path / "notjson.jsonl"], "line 1 is not valid JSON"),
    ]
    for argv, match in cases:
        code, _, err = run_cli(capsys, "trace", "import", *argv, "--out", tmp_path / "o.parquet")
        assert code == 2 and "\n" not in err, (argv, err)
        assert __import__("re").search(match, err), (match, err)
        assert not (tmp_path / "o.parquet").exists()
    code, _, err = run_cli(capsys, "trace", "export", tmp_path / "none.parquet", "--format", "replay",
                           "--out", tmp_path / "r.npy")
    assert code == 2 and "trace not found" in err


def test_replay_padded_batch_with_token_ids(tmp_path):
    rng = np.random.default_rng(3)
    B, T, L, K, E = 2, 6, 2, 2, 5
    ids = np.stack([np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(T)])
                    for _ in range(B)]).astype(np.int32)
    ids[1, 4:] = -1  # the second sequence is two tokens shorter: padding
    tokens = rng.integers(0, 99, (B, T + 1))  # one more token than routed: without the last token
    save_file({"routed_experts": ids, "input_ids": tokens}, str(tmp_path / "b.safetensors"))
    import_trace("replay", tmp_path / "b.safetensors", tmp_path / "b.parquet", num_experts=E)
    want = expected_rows([ids[0], ids[1]], [tokens[0], tokens[1]])
    assert_rows(open_trace(tmp_path / "b.parquet"), want, with_tokens=True)
    save_file({"routed_experts": ids, "input_ids": tokens[:, :3]}, str(tmp_path / "c.safetensors"))
    with pytest.raises(MoelabError, match="do not match routed_experts"):
        import_trace("replay", tmp_path / "c.safetensors", tmp_path / "c.parquet")


@pytest.mark.parametrize("batch_rows", [3, 11, 10**6])
def test_replay_from_a_trace_streams_a_sequence_at_a_time(tmp_path, monkeypatch, batch_rows):
    """trace_to_replay reads batch by batch, the last sequence of each waiting for the next: batches of 3
    and 11 rows cut sequences, tokens and layers anywhere and give what one batch gives, checked against
    the trace's rows scattered by hand."""
    from moelab.trace.io import Trace

    trace = planted_trace(tmp_path / "t.parquet")
    cols = read(trace, ["seq", "pos", "layer", "rank", "expert", "token"])
    real = Trace.iter_batches
    monkeypatch.setattr(Trace, "iter_batches", lambda self, columns=None, **k: real(self, columns, batch_rows=batch_rows))
    rep = trace_to_replay(trace.path)
    seqs = np.unique(cols["seq"])
    assert len(rep["ids"]) == len(seqs) == len(rep["tokens"])
    for s, ids, tok in zip(seqs, rep["ids"], rep["tokens"]):
        m = cols["seq"] == s
        want = np.full(ids.shape, -1, np.int32)
        for p, l, r, e in zip(cols["pos"][m], cols["layer"][m], cols["rank"][m], cols["expert"][m]):
            want[p, l, r] = e
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_array_equal(tok[cols["pos"][m]], cols["token"][m])
