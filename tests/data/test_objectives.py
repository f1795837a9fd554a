import numpy as np
import pytest
import torch

from moelab.config import ConfigError, MoelabError
from moelab.data.build import build_corpus
from moelab.data.config import DataConfig
from moelab.data.objectives import (IGNORE_INDEX, CorpusSampler, MixedSampler, balanced_spans, build_sampler,
                                   iter_sequential)

DTYPES = {"input_ids": torch.int64, "labels": torch.int64, "doc": torch.int64, "pos": torch.int64,
          "domain_id": torch.int16, "lang_id": torch.int16, "turn": torch.int16}


def naive_meta(c, t: int):
    """The oracle: walk the document index to find flat position t's document and offset."""
    for doc in range(c.num_docs):
        if c.doc_start[doc] <= t <= c.doc_start[doc] + c.doc_length[doc]:  # <=: the EOS belongs to it
            turn = -1 if c.turns is None else int(c.turns[t])
            return doc, t - c.doc_start[doc], c.doc_domain[doc], c.doc_lang[doc], turn
    raise AssertionError(t)


def flat_positions(c, batch):
    """Flat token positions of a batch's text tokens (padding: -1)."""
    doc, pos = batch["doc"].numpy(), batch["pos"].numpy()
    return np.where(doc >= 0, c.doc_start[np.maximum(doc, 0)] + pos, -1)


def test_causal_batches_are_windows_with_metadata(small_corpus):
    c = small_corpus
    sampler = CorpusSampler(c, seq_len=32, batch_size=4, seed=7)
    batch = sampler.batch(0)
    assert {k: v.dtype for k, v in batch.items()} == DTYPES
    assert all(v.shape == (4, 32) for v in batch.values())
    assert torch.equal(batch["labels"], batch["input_ids"])  # the model shifts; nothing is padding here
    lo, hi = c.split_range("train")
    flat = flat_positions(c, batch)
    for row in range(4):
        start = flat[row, 0]
        assert lo <= start and start + 32 <= hi
        assert (flat[row] == start + np.arange(32)).all()  # consecutive tokens, across documents
        assert batch["input_ids"][row].tolist() == c.tokens[start:start + 32].tolist()
        for s in (0, 13, 31):
            got = tuple(int(batch[k][row, s]) for k in ("doc", "pos", "domain_id", "lang_id", "turn"))
            assert got == naive_meta(c, start + s)


def test_causal_batches_depend_only_on_seed_and_step(small_corpus):
    a = CorpusSampler(small_corpus, seq_len=16, batch_size=3, seed=1)
    b = CorpusSampler(small_corpus, seq_len=16, batch_size=3, seed=1)
    assert torch.equal(a.batch(5)["input_ids"], b.batch(5)["input_ids"])
    assert not torch.equal(a.batch(5)["input_ids"], a.batch(6)["input_ids"])
    assert not torch.equal(a.batch(5)["input_ids"], CorpusSampler(small_corpus, seq_len=16, batch_size=3,
                                                                  seed=2).batch(5)["input_ids"])
    first = next(iter(a))
    assert torch.equal(first["input_ids"], a.batch(0)["input_ids"])


def test_heldout_windows_stay_in_the_split(small_corpus):
    lo, hi = small_corpus.split_range("heldout")
    batch = CorpusSampler(small_corpus, seq_len=16, batch_size=8, split="heldout").batch(3)
    flat = flat_positions(small_corpus, batch)
    assert (flat >= lo).all() and (flat < hi).all()
    assert (small_corpus.doc_split[batch["doc"].numpy()] == 1).all()


def test_a_split_shorter_than_a_row_is_padded(tmp_path):
    c = build_corpus(tmp_path / "c", ["math:3"], vocab_size=400, heldout_fraction=0.3)
    lo, hi = c.split_range("heldout")
    n = hi - lo
    batch = CorpusSampler(c, seq_len=n + 10, batch_size=2, split="heldout").batch(0)
    assert batch["input_ids"][0, :n].tolist() == c.tokens[lo:hi].tolist()
    assert (batch["input_ids"][:, n:] == c.pad_id).all() and (batch["labels"][:, n:] == IGNORE_INDEX).all()
    assert all((batch[k][:, n:] == -1).all() for k in ("doc", "pos", "domain_id", "lang_id", "turn"))


def test_sequential_pass_covers_each_token_once(small_corpus):
    c = small_corpus
    batches = list(iter_sequential(c, seq_len=24, batch_size=3, split="train"))
    assert all(b["input_ids"].shape[0] <= 3 for b in batches)
    flat = np.concatenate([flat_positions(c, b).reshape(-1) for b in batches])
    flat = flat[flat >= 0]
    lo, hi = c.split_range("train")
    assert flat.tolist() == list(range(lo, hi))  # every token once, in order
    ids = np.concatenate([b["input_ids"].reshape(-1).numpy() for b in batches])
    assert ids[: hi - lo].tolist() == c.tokens[lo:hi].tolist()
    assert (ids[hi - lo:] == c.pad_id).all()


def test_sequential_pass_of_one_domain(small_corpus):
    c = small_corpus
    docs = c.doc_ids(domain="chat")
    expected = np.concatenate([np.arange(c.doc_start[d], c.doc_start[d] + c.doc_length[d] + 1) for d in docs])
    batches = list(iter_sequential(c, seq_len=10, batch_size=2, split=None, domain="chat"))
    flat = np.concatenate([flat_positions(c, b).reshape(-1) for b in batches])
    assert flat[flat >= 0].tolist() == expected.tolist()
    chat = c.domains.index("chat")
    assert all(((b["domain_id"] == chat) | (b["doc"] == -1)).all() for b in batches)
    assert any((b["turn"] >= 1).any() for b in batches)
    with pytest.raises(MoelabError, match="has no domain 'poetry'"):
        iter_sequential(c, seq_len=10, batch_size=2, domain="poetry")


def test_balanced_spans_by_hand():
    # domain 0: documents of 50 and 30 tokens; domain 1: 10 and 5; domain 2: 100.
    domain_D, spans_D = np.array([0, 0, 1, 1, 2]), np.array([50, 30, 10, 5, 100])
    # 60 tokens: domain 1 (15 in all) takes all it has, the other two share the 45 left: 22 and 23, the
    # smaller total first (domain 0, 80 tokens, gets the floor)
    assert balanced_spans(domain_D, spans_D, 60).tolist() == [22, 0, 10, 5, 23]
    assert balanced_spans(domain_D, spans_D, 3).tolist() == [1, 0, 1, 0, 1]
    assert balanced_spans(domain_D, spans_D, 96).tolist() == [40, 0, 10, 5, 41]
    assert balanced_spans(domain_D, spans_D, 1000).tolist() == spans_D.tolist()  # all of it, never more
    # one domain: its first tokens in order, as a plain prefix
    assert balanced_spans(np.zeros(3, int), np.array([4, 4, 4]), 6).tolist() == [4, 2, 0]


def test_a_budget_short_of_the_split_reaches_every_domain(small_corpus):
    # The held-out split in corpus order: a prefix of it reaches the first domain only (the failure this
    # guards against: on Python 3.12 one long stdlib module filled a 2,048-token smoke trace).
    c = small_corpus
    docs = c.doc_ids("heldout")
    domains = np.unique(c.doc_domain[docs])
    assert len(domains) >= 2
    first = docs[c.doc_domain[docs] == c.doc_domain[docs[0]]]
    budget = int((c.doc_length[first] + 1).sum()) // 2  # inside the first domain's text
    prefix = list(iter_sequential(c, seq_len=8, batch_size=4, split="heldout"))
    got = list(iter_sequential(c, seq_len=8, batch_size=4, split="heldout", balanced_tokens=budget))
    dom = np.concatenate([b["domain_id"].reshape(-1).numpy() for b in got])
    assert (dom >= 0).sum() == budget and set(np.unique(dom[dom >= 0])) == set(domains.tolist())
    assert len(np.unique(np.concatenate([b["domain_id"].reshape(-1).numpy() for b in prefix])[:budget])) == 1
    # each token is the corpus's own at its place: a leading run of each chosen document, in document order
    pos = np.concatenate([flat_positions(c, b).reshape(-1) for b in got])
    pos = pos[pos >= 0]
    ids = np.concatenate([b["input_ids"].reshape(-1).numpy() for b in got])[: len(pos)]
    assert ids.tolist() == c.tokens[pos].tolist() and (np.diff(pos) > 0).all()
    doc_of = np.searchsorted(c.doc_start, pos, side="right") - 1
    for d in np.unique(doc_of):
        mine = pos[doc_of == d]
        assert mine.tolist() == list(range(c.doc_start[d], c.doc_start[d] + len(mine)))
    # a budget the split fits in changes nothing
    whole = list(iter_sequential(c, seq_len=8, batch_size=4, split="heldout", balanced_tokens=10**9))
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(whole, prefix)) and len(whole) == len(prefix)


def test_mixed_sampler_swaps_rows_for_the_first_steps(tmp_path, small_corpus):
    other = build_corpus(tmp_path / "code", ["stdlib-code"], small_corpus.tokenizer(), max_docs_per_source=5)
    primary = CorpusSampler(small_corpus, seq_len=16, batch_size=4, seed=0)
    secondary = CorpusSampler(other, seq_len=16, batch_size=4, seed=1)
    mixed = MixedSampler(primary, secondary, fraction=1.0, steps=2)
    assert mixed.domains == small_corpus.domains + ["code"]
    assert mixed.langs == small_corpus.langs + ["py"]
    for step in (0, 1):
        batch = mixed.batch(step)
        assert torch.equal(batch["input_ids"], secondary.batch(step)["input_ids"])
        assert (batch["domain_id"] == mixed.domains.index("code")).all()
        assert (batch["lang_id"] == mixed.langs.index("py")).all()
        assert (batch["doc"] >= small_corpus.num_docs).all()
    assert torch.equal(mixed.batch(2)["input_ids"], primary.batch(2)["input_ids"])
    half = MixedSampler(primary, secondary, fraction=0.5, steps=100)
    code = mixed.domains.index("code")
    code_rows = sum(int((half.batch(s)["domain_id"][:, 0] == code).sum()) for s in range(50))
    assert 70 <= code_rows <= 130  # 200 rows at p = 0.5


def test_mixing_needs_one_tokenizer(tmp_path, small_corpus):
    other = build_corpus(tmp_path / "other", ["math:10"], vocab_size=400)
    with pytest.raises(MoelabError, match="use different tokenizers"):
        MixedSampler(CorpusSampler(small_corpus, seq_len=8, batch_size=2),
                     CorpusSampler(other, seq_len=8, batch_size=2), fraction=0.5, steps=3)


def test_build_sampler_from_config(tmp_path, small_corpus):
    sampler = build_sampler(DataConfig(path=str(small_corpus.path), seq_len=16, batch_size=2))
    assert isinstance(sampler, CorpusSampler)
    ul2 = build_sampler(DataConfig(path=str(small_corpus.path), seq_len=64, batch_size=2, objective="ul2"))
    assert "denoiser" in ul2.batch(0)
    other = build_corpus(tmp_path / "code", ["stdlib-code"], small_corpus.tokenizer(), max_docs_per_source=3)
    mixed = build_sampler(DataConfig(path=str(small_corpus.path), seq_len=16, batch_size=2,
                                     mix_path=str(other.path), mix_steps=10, mix_fraction=0.25))
    assert isinstance(mixed, MixedSampler) and mixed.steps == 10
    with pytest.raises(ConfigError, match="data.path is not set"):
        build_sampler(DataConfig())
    with pytest.raises(MoelabError, match="does not exist"):
        build_sampler(DataConfig(path=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("changes, message", [
    ({"seq_len": 1}, "seq_len=1"), ({"batch_size": 0}, "batch_size=0"),
    ({"objective": "mlm"}, "objective='mlm'"), ({"eval_split": "test"}, "eval_split='test'"),
    ({"mix_fraction": 1.5}, "mix_fraction=1.5"), ({"mix_steps": -1}, "mix_steps=-1"),
    ({"mix_steps": 10, "mix_fraction": 0.2}, "mix_path must be set"),
    ({"mix_steps": 10, "mix_path": "x"}, "mix_fraction must be > 0"),
    ({"mix_path": "x", "mix_fraction": 0.2}, "mix_steps must be > 0"),
])
def test_data_config_validation_names_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**changes)


def test_data_config_round_trips():
    cfg = DataConfig(path="/data/c", seq_len=128, objective="ul2", mix_path="/data/m", mix_steps=5,
                     mix_fraction=0.1)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="data.seq_len"):
        DataConfig.from_dict({"seq_len": "long"}, path="data")
