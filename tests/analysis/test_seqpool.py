"""The within-sequence null of the token-level groupings (analysis/seqpool.py), on planted bursty text.

Bursty text: each sequence draws its tokens from its own 40 of 2,000 token IDs, as a document repeats its
words. The routing follows a per-sequence topic plus noise and ignores the token ID, so a null that keeps
sequences whole must find no token-ID specialisation; the token shuffle finds it every time.
"""

import numpy as np
import pytest

from moelab.analysis.resample import SetPoolAccumulator
from moelab.analysis.seqpool import SAMPLE_NULL, SEQ_NULL, SequencePoolAccumulator, within_sequence_null
from moelab.analysis.specialization import _max_share_G, vocab_layer
from moelab.analysis.suite import analyze_all
from moelab.analysis.synthetic import clustered_batch
from moelab.analysis.tables import ShareAccumulator

E, K = 8, 2


def bursty_trace(seed: int, *, seqs: int = 64, seq_len: int = 128, layers: int = 1, token_effect: float = 0.0,
                 per_seq: int = 40, vocab: int = 2000, noise: float = 0.8) -> dict:
    return clustered_batch(seed, num_seqs=seqs, seq_len=seq_len, num_layers=layers, num_experts=E, top_k=K,
                           vocab=vocab, ids_per_seq=per_seq, token_sd=1.5 * token_effect, noise_sd=noise)


def token_results(batch: dict, layers: int = 1) -> dict:
    return analyze_all([batch], num_experts=[E] * layers, top_k=K, analyses=("specialisation",), labels=(),
                       min_count=5, vocab_min_count=5, n_permutations=64, n_bootstrap=0)


def test_token_ids_the_routing_ignores_sit_at_their_null_in_bursty_text():
    p = []
    for s in range(30):
        r = token_results(bursty_trace(s))
        p.append([r["vocab"].overall.p, r["std_token"].overall.p])
        assert r["vocab"].overall.null == SEQ_NULL and r["std_token"].overall.null == SEQ_NULL
    p = np.array(p)
    rejected = (p <= 0.05).sum(axis=0)
    assert (rejected <= 5).all(), f"within-sequence null rejected {rejected} of 30 at 5% (expected about 1.5)"
    assert (p > 0.5).sum(axis=0).min() >= 9, "p-values piled up low: the null is too narrow"


def test_the_token_shuffle_finds_specialisation_in_the_same_text():
    """The null this module replaces, on the same traces: what the planted test above would catch."""
    rejected = 0
    for s in range(10):
        b = bursty_trace(s)
        tables = _tables(b)
        pool = SetPoolAccumulator([E], K)
        pool.update(b)
        part = vocab_layer(tables, 0, min_count=5, pool=pool.result(), n_permutations=64)
        rejected += np.mean(part["null"] >= _value(part)) <= 0.05
    assert rejected >= 8


def _tables(batch, group="token", layers=1):
    acc = ShareAccumulator(group, [E] * layers, K, folds=1)
    acc.update(batch)
    return acc.result()


def _value(part):
    return (part["mean"] - K / E) / (1 - K / E)


def test_token_ids_the_routing_follows_are_found():
    for s in range(5):
        r = token_results(bursty_trace(s, token_effect=1.0, per_seq=200, vocab=300))
        assert r["vocab"].overall.p <= 1 / 65 + 1e-12 and r["std_token"].overall.p <= 1 / 65 + 1e-12


def _pool(batch, layers=1, **kw):
    acc = SequencePoolAccumulator([E] * layers, K, **kw)
    acc.update(batch)
    return acc.result()


def test_a_routing_set_by_the_sequence_alone_leaves_the_null_exactly_at_the_value():
    """Every token of a sequence gets the same experts: moving labels within a sequence moves nothing."""
    b = bursty_trace(1, noise=0.0)
    tables, pool = _tables(b), _pool(b)
    assert pool.within_sequence(0)
    keep = tables.tokens(0) >= 5
    value = float(np.mean(_max_share_G(tables.counts[0][keep], tables.tokens(0)[keep])))
    values = pool.token[0]
    draws = within_sequence_null(pool, 0, values, tables.groups[0][keep], E, _max_share_G, 8, seed=0)
    np.testing.assert_allclose(draws, value, rtol=0, atol=1e-12)


def test_a_within_sequence_permutation_keeps_each_group_size_and_the_load():
    b = bursty_trace(2, layers=2)
    tables, pool = _tables(b, layers=2), _pool(b, layers=2)
    for l in range(2):
        seen = {}

        def stat(counts, n_G):
            seen.setdefault("n", []).append(n_G.copy())
            seen.setdefault("load", []).append(counts.sum(axis=0))
            return np.zeros(len(n_G))

        within_sequence_null(pool, l, pool.token[l], tables.groups[l], E, stat, 4, seed=3)
        for n, load in zip(seen["n"], seen["load"]):
            np.testing.assert_array_equal(n, tables.tokens(l))
            np.testing.assert_array_equal(load, tables.counts[l].sum(axis=0))


@pytest.mark.parametrize("cuts", [(13,), (2,), (30,), (3, 30), (5, 10, 20, 35)])
def test_past_its_size_the_pool_keeps_whole_sequences_the_same_way_in_parts(cuts):
    """Parts of every size (a short one is never trimmed: its threshold is the top, on either side of
    the merge), merged in order: the pool of one pass."""
    b = bursty_trace(3, seqs=40, seq_len=32)
    one = _pool(b, size=300)
    assert not one.within_sequence(0)
    sets, complete = one.layer(0)
    assert not complete and 0 < len(sets) <= 300
    assert len(np.unique(one.seq[0])) * 32 == len(sets)  # whole sequences only
    n = len(b["seq"])
    edges = [0] + [c * 32 * K for c in cuts] + [n]  # sequence starts
    parts = [_pool({k: (v[lo:hi] if isinstance(v, np.ndarray) and len(v) == n else v) for k, v in b.items()},
                   size=300) for lo, hi in zip(edges, edges[1:])]
    for part in parts[1:]:
        parts[0].merge(part)
    parts[0].layer(0)
    for name in ("seq", "pos", "token", "sets"):
        np.testing.assert_array_equal(getattr(parts[0], name)[0], getattr(one, name)[0])
    r = analyze_all([b], num_experts=[E], top_k=K, analyses=("specialisation",), labels=(), min_count=5,
                    vocab_min_count=5, n_permutations=8, n_bootstrap=0, batch_rows=512)
    assert r["vocab"].overall.null == SEQ_NULL  # the suite's pool holds this trace whole


@pytest.mark.parametrize("group", ["pos", "pos_bucket"])
def test_positions_shuffle_within_sequences_too(group):
    b = bursty_trace(4)
    acc = ShareAccumulator(group, [E], K, folds=1, pos_bucket=16)
    acc.update(b)
    tables = acc.result()
    pool = _pool(b)
    from moelab.analysis.specialization import within_sequence_values

    values = within_sequence_values(pool, 0, tables)
    assert values is not None
    np.testing.assert_array_equal(np.unique(values), tables.groups[0])
    assert SAMPLE_NULL != SEQ_NULL


def test_a_grouping_the_pool_has_no_values_of_keeps_the_token_shuffle_and_says_so():
    from moelab.analysis.specialization import PERM_NULL, std_score

    b = bursty_trace(5)
    b["turn"] = (b["pos"] // 32).astype(np.int16)
    acc = ShareAccumulator("turn", [E], K, folds=1)
    acc.update(b)
    score = std_score(acc.result(), min_count=5, pool=_pool(b), n_permutations=8)
    assert score.overall.null == PERM_NULL and np.isfinite(score.overall.null_mean)


def test_checkpoints_that_agree_on_context_only_show_no_early_token_routing():
    """Both route bursty text by the sequence's topic, with independent noise: their token tables agree
    through the sequences, so the JSD must sit at the within-sequence null, not below it."""
    from moelab.analysis.early import early_routing

    p = []
    for s in range(6):
        final = bursty_trace(s)
        ckpt = clustered_batch(s, num_experts=E, top_k=K, vocab=2000, ids_per_seq=40, noise_sd=0.8, noise_seed=1)
        np.testing.assert_array_equal(ckpt["token"], final["token"])
        res = early_routing([[ckpt], [final]], num_experts=[E], top_k=K, min_count=5, steps=[1], n_permutations=32,
                            n_bootstrap=0)
        assert "each sequence" in res.first["jsd"].null
        p.append(res.first["jsd"].p)
    assert sum(v > 0.05 for v in p) >= 5, p


# ---- past the pool's size: the test on a hash sample of whole sequences ----------------------------------
def _p(value, draws):
    return (1 + np.sum(np.asarray(draws) >= value - 1e-12)) / (1 + len(draws))


def _sampled_parts(b, size, min_count=5):
    from moelab.analysis.specialization import null_text, std_layer

    tables, pool = _tables(b), _pool(b, size=size)
    assert not pool.within_sequence(0)
    v = vocab_layer(tables, 0, min_count=min_count, pool=pool, n_permutations=64)
    s = std_layer(tables, 0, min_count=min_count, pool=pool, n_permutations=64)
    assert null_text(pool, 0, tables) == SAMPLE_NULL
    return _p(_value(v), v["null"]), _p(s["mean"], s["null"])


def test_past_its_size_token_ids_the_routing_ignores_sit_at_the_sample_tests_null():
    """8,192 tokens of bursty text, the pool holding a quarter of the sequences: the sample test rejects at
    its level, where the token shuffle it replaces rejected every time (the test above)."""
    p = np.array([_sampled_parts(bursty_trace(100 + s), size=2048) for s in range(30)])
    rejected = (p <= 0.05).sum(axis=0)
    assert (rejected <= 5).all(), f"sample test rejected {rejected} of 30 at 5% (expected about 1.5)"
    assert (p > 0.5).sum(axis=0).min() >= 9, "p-values piled up low: the null is too narrow"


def test_past_its_size_token_ids_the_routing_follows_are_found_on_the_sample():
    for s in range(3):
        p = _sampled_parts(bursty_trace(s, token_effect=1.0, per_seq=200, vocab=300), size=2048)
        assert max(p) <= 1 / 65 + 1e-12, p


def test_the_sample_test_is_the_complete_test_of_the_sampled_sequences_shifted_to_the_full_value():
    """Reference: the trace cut down to the pool's sequences by their rows, its own tables (no pool code),
    the complete within-sequence null on it; the sample test's draws are the full value less that
    sub-trace's excess over each draw, group for group."""
    b = bursty_trace(7, seqs=48, seq_len=64, vocab=120)
    tables, pool = _tables(b), _pool(b, size=1000)
    kept_seqs = np.unique(pool.seq[0])
    assert 0 < len(kept_seqs) * 64 <= 1000
    rows = np.isin(b["seq"], kept_seqs)
    n = len(b["seq"])
    sub = {k: (v[rows] if isinstance(v, np.ndarray) and len(v) == n else v) for k, v in b.items()}
    sub_tables, sub_pool = _tables(sub), _pool(sub)
    assert sub_pool.within_sequence(0)
    np.testing.assert_array_equal(sub_pool.seq[0], pool.seq[0])  # the same canonical order, the same shuffles

    min_count = 20
    keep = tables.tokens(0) >= min_count
    full = float(np.mean(_max_share_G(tables.counts[0][keep], tables.tokens(0)[keep])))
    frac = len(pool.seq[0]) / n * K
    sub_n = dict(zip(sub_tables.groups[0], sub_tables.tokens(0)))
    used = np.array([g for g in tables.groups[0][keep] if sub_n.get(g, 0) >= max(2, np.ceil(min_count * frac))])
    assert 5 < len(used) < keep.sum()
    at = np.searchsorted(sub_tables.groups[0], used)
    sub_value = float(np.mean(_max_share_G(sub_tables.counts[0][at], sub_tables.tokens(0)[at])))
    sub_draws = within_sequence_null(sub_pool, 0, sub_pool.token[0], used, E, _max_share_G, 16, seed=5)
    draws = within_sequence_null(pool, 0, pool.token[0], tables.groups[0][keep], E, _max_share_G, 16, seed=5,
                                 value=full, min_count=min_count)
    np.testing.assert_allclose(draws, full - (sub_value - sub_draws), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="full value"):
        within_sequence_null(pool, 0, pool.token[0], tables.groups[0][keep], E, _max_share_G, 4, seed=5)


def test_the_suite_says_which_layers_ran_the_sample_test(monkeypatch):
    import functools

    import moelab.analysis.suite as suite

    monkeypatch.setattr(suite, "SequencePoolAccumulator", functools.partial(SequencePoolAccumulator, size=2048))
    r = token_results(bursty_trace(11, layers=2), layers=2)
    assert r["vocab"].overall.null == SAMPLE_NULL and r["std_token"].overall.null == SAMPLE_NULL
    assert all(e.null == SAMPLE_NULL for e in r["vocab"].estimates)
    assert np.isfinite(r["vocab"].overall.null_mean) and 0 < r["vocab"].overall.p <= 1
    from moelab.report.headline import shuffled_where

    assert shuffled_where(r["vocab"].overall) == "within each sequence of a sample of whole sequences"


def _early_p(monkeypatch, final, ckpt, size):
    import functools

    import moelab.analysis.early as early
    from moelab.analysis.seqpool import SequencePool

    monkeypatch.setattr(early, "SequencePool", functools.partial(SequencePool, size=size))
    res = early.early_routing([[ckpt], [final]], num_experts=[E], top_k=K, min_count=5, steps=[1], n_permutations=32,
                              n_bootstrap=0)
    assert "hash sample of whole sequences" in res.first["jsd"].null
    return res.first["jsd"].p


def test_past_its_size_checkpoints_that_agree_on_context_only_show_no_early_token_routing(monkeypatch):
    p = []
    for s in range(6):
        final = bursty_trace(s)
        ckpt = clustered_batch(s, num_experts=E, top_k=K, vocab=2000, ids_per_seq=40, noise_sd=0.8, noise_seed=1)
        p.append(_early_p(monkeypatch, final, ckpt, size=2048))
    assert sum(v > 0.05 for v in p) >= 5, p


def test_past_its_size_checkpoints_that_agree_on_token_routing_are_found(monkeypatch):
    kw = dict(num_experts=E, top_k=K, vocab=300, ids_per_seq=200, token_sd=1.5, noise_sd=0.8)
    for s in range(3):
        p = _early_p(monkeypatch, clustered_batch(s, **kw), clustered_batch(s, noise_seed=1, **kw), size=2048)
        assert p <= 1 / 33 + 1e-12, p


def test_parts_of_sequences_of_any_length_merge_to_the_pool_of_one_pass():
    """Sequences of 1-40 tokens: which sequences fit past the size depends on their lengths, so a part's
    tokens hashed over the other side's threshold must be dropped at the merge, not left to the trim."""
    from moelab.analysis.seqpool import SequencePool

    for seed in range(200):
        rng = np.random.default_rng(seed)
        lens, size = rng.integers(1, 41, 30), int(rng.integers(40, 300))
        seq = np.repeat(np.arange(30), lens)
        pos = np.concatenate([np.arange(n) for n in lens])
        token, sets = rng.integers(0, 50, len(seq)), rng.integers(0, E, (len(seq), K))
        starts = np.concatenate(([0], np.cumsum(lens)))
        edges = [0, *sorted(rng.choice(starts[1:-1], int(rng.integers(1, 4)), replace=False)), len(seq)]

        def pool(lo, hi):
            p = SequencePool(1, K, size=size, seed=seed)
            for a in range(lo, hi, 17):  # batches cut anywhere
                b = min(a + 17, hi)
                p.add(0, seq[a:b], pos[a:b], token[a:b], sets[a:b])
            return p

        one, parts = pool(0, len(seq)), [pool(lo, hi) for lo, hi in zip(edges, edges[1:])]
        for part in parts[1:]:
            parts[0].merge(part)
        one.layer(0)
        parts[0].layer(0)
        for name in ("seq", "pos", "token", "sets"):
            np.testing.assert_array_equal(getattr(parts[0], name)[0], getattr(one, name)[0], err_msg=f"seed {seed}")
        assert parts[0].seen[0] == one.seen[0] == len(seq)


def test_one_sequence_longer_than_the_pool_is_kept_whole():
    from moelab.analysis.seqpool import SequencePool

    p = SequencePool(1, K, size=10)
    p.add(0, np.zeros(25, np.int64), np.arange(25), np.arange(25), np.zeros((25, K), np.int64))
    sets, complete = p.layer(0)
    assert len(sets) == 25 and complete and p.threshold[0] == np.iinfo(np.uint64).max


def test_a_later_parts_bound_drops_an_earlier_parts_short_sequence_hashed_past_it():
    """Hand-made: size 10; the later part holds A (8 tokens) and X (5), A hashed first, so it keeps A and
    can never take X or anything hashed past X. The earlier part holds only S (2 tokens), hashed past X.
    One pass orders A, X, S: A fits, A + X does not, so the pool is A alone; S must not slip in beside A."""
    from moelab.analysis.seqpool import SequencePool

    p = SequencePool(1, K, size=10)
    ids = np.arange(200)
    prio = p._prio(ids)
    a, x, s = ids[np.argsort(prio)][[10, 11, 150]]  # prio(A) < prio(X) < prio(S)

    def part(seqs, lens):
        q = SequencePool(1, K, size=10)
        seq = np.repeat(np.asarray(seqs, np.int64), lens)
        pos = np.concatenate([np.arange(n) for n in lens])
        q.add(0, seq, pos, np.zeros(len(seq), np.int64), np.zeros((len(seq), K), np.int64))
        return q

    one = part([s, a, x], [2, 8, 5])
    earlier, later = part([s], [2]), part([a, x], [8, 5])
    later.layer(0)  # past its size: keeps A, bounds out X and above
    earlier.merge(later)
    for q in (one, earlier):
        q.layer(0)
        assert set(q.seq[0].tolist()) == {int(a)} and len(q.seq[0]) == 8
