import json

import numpy as np
import pytest

from moelab.config import MoelabError
from moelab.data import build as buildmod
from moelab.data.build import assign_heldout, build_corpus
from moelab.data.shards import load_corpus, token_dtype
from moelab.data.sources import capped, open_source


def test_assign_heldout_hand_worked():
    u = np.array([0.5, 0.01, 0.9, 0.3, 0.02])
    domains = np.array([0, 0, 1, 1, 2])
    # Domain 0 holds out its u < 0.05 document; domain 1 has none, so its lowest-u document goes;
    # domain 2 has one document, which stays in training.
    assert assign_heldout(u, domains, 0.05).tolist() == [False, True, False, True, False]
    # Everything but u=0.9 falls under 0.95: each domain keeps its highest-u document for training.
    assert assign_heldout(u, domains, 0.95).tolist() == [False, True, False, True, False]
    assert assign_heldout(u, domains, 0.4).tolist() == [False, True, False, True, False]
    assert not assign_heldout(u, domains, 0.0).any()


def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


def test_layout_documents_eos_and_text(small_corpus, chat_jsonl):
    c = small_corpus
    tok = c.tokenizer()
    assert c.tokens.dtype == np.uint16 and isinstance(c.tokens, np.memmap)
    assert sorted(p.name for p in c.path.iterdir()) == ["corpus.json", "docs.parquet", "tokenizer.json",
                                                        "tokens.npy", "turns.npy"]
    # Documents tile the array, each followed by EOS.
    assert c.doc_start[0] == 0 and c.num_tokens == c.doc_start[-1] + c.doc_length[-1] + 1
    assert (c.doc_start[1:] == c.doc_start[:-1] + c.doc_length[:-1] + 1).all()
    assert (c.tokens[c.doc_start + c.doc_length] == c.eos_id).all()
    # Every document decodes back to the text its source gave.
    expected = {}
    for spec in ["math:80", "python-docs", f"jsonl:{chat_jsonl}"]:
        for d in capped(open_source(spec), max_docs=12):
            expected[(spec, d.name)] = d.text
    rows = c.docs.to_pylist()
    assert len(rows) == len(expected) == 12 + 12 + 5
    for row in rows:
        ids = c.tokens[row["start"]: row["start"] + row["length"]]
        assert tok.decode(ids) == expected[(row["source"], row["name"])]
        assert row["num_bytes"] == len(expected[(row["source"], row["name"])].encode())


def test_turns_index_each_token(small_corpus, conversations):
    c = small_corpus
    tok = c.tokenizer()
    chats = c.doc_ids(domain="chat")
    assert len(chats) == 3
    for doc in chats:
        start, n = c.doc_start[doc], c.doc_length[doc]
        turns = np.asarray(c.turns[start:start + n])
        conv = next(t for t in conversations if "\n".join(t) == tok.decode(c.tokens[start:start + n]))
        assert turns[0] == 0 and (np.diff(turns) >= 0).all() and turns[-1] == len(conv) - 1
        for i, text in enumerate(conv):  # each turn's tokens decode to that turn (plus its newline)
            assert tok.decode(c.tokens[start:start + n][turns == i]) == text + ("\n" if i < len(conv) - 1 else "")
        assert c.turns[start + n] == -1  # the EOS
    others = np.setdiff1d(np.arange(c.num_docs), chats)
    assert all((c.turns[c.doc_start[d]: c.doc_start[d] + c.doc_length[d]] == -1).all() for d in others)


def test_splits_are_contiguous_and_cover_every_domain(small_corpus):
    c = small_corpus
    lo, hi = c.split_range("heldout")
    assert c.split_range("train") == (0, lo) and hi == c.num_tokens
    split = c.doc_split
    assert (np.diff(split) >= 0).all()  # all train documents, then all held-out ones
    for d, name in enumerate(c.domains):
        in_domain = split[c.doc_domain == d]
        if len(in_domain) >= 2:
            assert in_domain.min() == 0 and in_domain.max() == 1, name


def test_summary_counts_add_up(small_corpus):
    info = json.loads((small_corpus.path / "corpus.json").read_text())
    assert info["num_tokens"] == small_corpus.num_tokens and info["num_documents"] == 29
    for table in ("splits", "per_domain", "per_lang"):
        rows = info[table].values()
        assert sum(r["tokens"] for r in rows) == info["num_tokens"]
        assert sum(r["documents"] for r in rows) == info["num_documents"]
        assert sum(r["bytes"] for r in rows) == info["num_bytes"]
    assert set(info["per_domain"]) == {"chat", "math", "notes", "prose"}
    assert set(info["per_lang"]) == {"de", "en", "und"}
    assert [s["spec"] for s in info["sources"]][:2] == ["math:80", "python-docs"]
    assert info["tokenizer"]["vocab_size"] == 600 and info["tokenizer"]["file"] == "tokenizer.json"
    assert info["has_turns"] is True


def test_build_is_deterministic_and_seeded(tmp_path):
    specs = ["math:40", "python-docs"]
    a = build_corpus(tmp_path / "a", specs, vocab_size=450, max_docs_per_source=20, heldout_fraction=0.2)
    b = build_corpus(tmp_path / "b", specs, vocab_size=450, max_docs_per_source=20, heldout_fraction=0.2)
    c = build_corpus(tmp_path / "c", specs, vocab_size=450, max_docs_per_source=20, heldout_fraction=0.2, seed=5)
    assert (tmp_path / "a" / "tokens.npy").read_bytes() == (tmp_path / "b" / "tokens.npy").read_bytes()
    assert a.docs.equals(b.docs)
    # (Compared on python-docs only: the seed also changes the generated math.)
    held = lambda corpus: {r["name"] for r in corpus.docs.to_pylist()
                           if r["split"] == "heldout" and r["source"] == "python-docs"}
    assert held(a) != held(c)  # a different seed holds out different documents...
    assert not (tmp_path / "c" / "turns.npy").exists()  # ...and no turns without conversations


def test_byte_cap_per_source(tmp_path):
    c = build_corpus(tmp_path / "c", ["python-docs", "math:500"], vocab_size=450, max_bytes_per_source=5000)
    for source in c.info["sources"]:
        assert 0 < source["bytes"] <= 5000


def test_given_tokenizer_is_used_and_saved(tmp_path, docs_tokenizer):
    c = build_corpus(tmp_path / "c", ["math:20"], docs_tokenizer)
    assert c.tokenizer().fingerprint() == docs_tokenizer.fingerprint()
    assert c.info["tokenizer"]["fingerprint"] == docs_tokenizer.fingerprint()
    path = docs_tokenizer.save(tmp_path / "tok.json")
    d = build_corpus(tmp_path / "d", ["math:20"], str(path))  # a path works too
    assert d.tokenizer().fingerprint() == docs_tokenizer.fingerprint()
    assert (tmp_path / "c" / "tokens.npy").read_bytes() == (tmp_path / "d" / "tokens.npy").read_bytes()


def test_transformers_tokenizer_is_saved_as_a_folder(tmp_path, docs_tokenizer, hf_tokenizer_dir):
    ours = build_corpus(tmp_path / "ours", ["math:20"], docs_tokenizer)
    hf = build_corpus(tmp_path / "hf", ["math:20"], str(hf_tokenizer_dir))
    assert (hf.path / "tokenizer" / "tokenizer_config.json").is_file()
    assert hf.info["tokenizer"]["kind"] == "hf" and hf.tokenizer().kind == "hf"
    assert np.array_equal(hf.tokens, ours.tokens)


def test_bad_requests_fail_before_writing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MoelabError, match="unknown source spec 'nope'"):
        build_corpus(out, ["math:5", "nope"])
    with pytest.raises(MoelabError, match="at least one source spec"):
        build_corpus(out, [])
    with pytest.raises(MoelabError, match="heldout_fraction"):
        build_corpus(out, ["math:5"], heldout_fraction=1.0)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MoelabError, match="already exists and is not empty"):
        build_corpus(out, ["math:5"])


def test_failure_mid_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(buildmod.shards, "write_docs_index", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_corpus(tmp_path / "out", ["math:5"], vocab_size=400)
    assert list(tmp_path.iterdir()) == []


def test_sources_with_no_documents(tmp_path):
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n')
    with pytest.raises(MoelabError, match="yielded no documents"):
        build_corpus(tmp_path / "out", [f"jsonl:{tmp_path / 'blank.jsonl'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.jsonl"]


def test_load_corpus_errors(tmp_path, small_corpus):
    with pytest.raises(MoelabError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoelabError, match="is empty"):
        load_corpus(tmp_path / "empty")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "tokens.npy").write_bytes((small_corpus.path / "tokens.npy").read_bytes())
    with pytest.raises(MoelabError, match="incomplete or not a moelab corpus"):
        load_corpus(partial)
    (partial / "corpus.json").write_text((small_corpus.path / "corpus.json").read_text())
    with pytest.raises(MoelabError, match="incomplete: missing docs.parquet, turns.npy"):
        load_corpus(partial)
    for name in ("docs.parquet", "turns.npy"):
        (partial / name).write_bytes((small_corpus.path / name).read_bytes())
    np.save(partial / "tokens.npy", np.zeros(5, np.uint16))
    with pytest.raises(MoelabError, match="does not match corpus.json"):
        load_corpus(partial)
