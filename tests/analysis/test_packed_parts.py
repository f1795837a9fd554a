"""Parts of the stream sent between processes (`parallel.py`): a packed part merges to exactly the counts of
the dense part, and of one pass."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from moelab.analysis.coactivation import CoactivationAccumulator
from moelab.analysis.common import PackedCounts
from moelab.analysis.tables import ShareAccumulator

E, K, L = 64, 8, 4


def _batch(rng, seqs, seq_len, domains=None):
    T = len(seqs) * seq_len
    seq = np.repeat(np.asarray(seqs), seq_len)
    pos = np.tile(np.arange(seq_len), len(seqs))
    rows = T * L * K
    b = {"seq": np.repeat(seq, L * K), "pos": np.repeat(pos, L * K),
         "layer": np.tile(np.repeat(np.arange(L), K), T), "rank": np.tile(np.arange(K), T * L),
         "expert": rng.integers(0, E, rows)}
    if domains is not None:
        b["domain"] = np.repeat(np.asarray(domains)[np.asarray(seqs) % len(domains)], seq_len * L * K)
    return b


def test_packed_counts_hand_worked():
    t = np.zeros((2, 3, 2), np.int32)
    t[0, 1, 1], t[1, 2, 0] = 5, 7
    p = PackedCounts(t)
    assert p.index.tolist() == [3, 10] and p.count.tolist() == [5, 7]
    out = np.ones((2, 4, 2), np.int64)  # wider group axis: cells land at the same (slot, value, expert)
    p.add_into(out)
    want = np.ones((2, 4, 2), np.int64)
    want[0, 1, 1] += 5
    want[1, 2, 0] += 7
    assert np.array_equal(out, want)
    assert np.array_equal(p.dense(), t)
    assert PackedCounts.worth(t) and not PackedCounts.worth(np.ones((2, 3, 2), np.int32))


@pytest.mark.parametrize("first_longer", [True, False])
def test_a_packed_part_merges_to_the_dense_part_counts(first_longer):
    """Position tables split by fold, over 2^16 cells, mostly empty in a part; the parts see different
    largest positions, so the group axis grows in either direction during the merge."""
    rng = np.random.default_rng(0)
    a_len, b_len = (300, 120) if first_longer else (120, 300)
    parts = []
    for seqs, n in (([0, 1, 2], a_len), ([3, 4], b_len)):
        acc = ShareAccumulator("pos", [E] * L, K, folds=32)
        acc.update(_batch(rng, seqs, n))
        parts.append(acc)
    assert parts[0].dense["split"].size >= 1 << 16
    plain, packed = copy.deepcopy(parts[0]), copy.deepcopy(parts[0])
    plain.merge(copy.deepcopy(parts[1]))
    sent = pickle.loads(pickle.dumps(copy.deepcopy(parts[1]).for_transfer()))
    assert isinstance(sent.dense["split"], PackedCounts)
    packed.merge(sent)
    assert plain.parts and packed.parts  # kept apart for the layers' jobs; added here
    plain.settle()
    packed.settle()
    assert plain.dense.keys() == packed.dense.keys()
    for name in plain.dense:
        assert plain.dense[name].dtype == packed.dense[name].dtype
        assert np.array_equal(plain.dense[name], packed.dense[name]), name
    assert plain.dense_rows == packed.dense_rows
    one = ShareAccumulator("pos", [E] * L, K, folds=32)  # and both equal one pass over all the rows
    rng = np.random.default_rng(0)
    for seqs, n in (([0, 1, 2], a_len), ([3, 4], b_len)):
        one.update(_batch(rng, seqs, n))
    assert np.array_equal(one.dense["split"], packed.dense["split"])


def test_a_packed_label_table_merges_through_the_label_codes():
    """Domain names met in another order by the later part: its packed table goes through the code map."""
    rng = np.random.default_rng(1)
    a = ShareAccumulator("domain", [E] * L, K, folds=32)
    a.update(_batch(rng, [0, 1], 16, domains=["web", "code"]))
    b = ShareAccumulator("domain", [E] * L, K, folds=32)
    b.update(_batch(rng, [2, 3, 4], 16, domains=["law", "code", "web"]))
    plain, packed = copy.deepcopy(a), copy.deepcopy(a)
    plain.merge(copy.deepcopy(b))
    b.dense = {name: PackedCounts(t) for name, t in b.dense.items()}  # below for_transfer's size: by hand
    packed.merge(b)
    for name in plain.dense:
        assert np.array_equal(plain.dense[name], packed.dense[name]), name
    assert plain.labels.names == packed.labels.names


def test_a_packed_coactivation_part_merges_to_the_dense_part_counts():
    rng = np.random.default_rng(2)

    def part(seqs):
        acc = CoactivationAccumulator([E] * L, K, folds=32)
        b = _batch(rng, seqs, 40)
        for l in range(L):  # k distinct experts per token
            rows = b["layer"] == l
            b["expert"][rows] = np.argsort(rng.random((rows.sum() // K, E)), axis=1)[:, :K].reshape(-1)
        acc.update(b)
        return acc

    a, b = part([0, 1]), part([2, 3, 4])
    plain, packed = copy.deepcopy(a), copy.deepcopy(a)
    plain.merge(copy.deepcopy(b))
    sent = pickle.loads(pickle.dumps(copy.deepcopy(b).for_transfer()))
    assert all(isinstance(c, PackedCounts) for c in sent.co)
    packed.merge(sent)
    for mine, theirs in zip(plain.co + plain.trans, packed.co + packed.trans):
        assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs)
    assert sum(int(c.sum()) for c in packed.co) == 5 * 40 * L * K * K  # every (token, rank, rank) cell once


def test_key_counter_matches_a_counter_over_batches_and_merged_parts():
    """The parent merges the parts' sparse counters: sorted unique keys, exact counts, as a plain Counter."""
    import collections

    from moelab.analysis.common import KeyCounter

    rng = np.random.default_rng(3)
    for trial in range(40):
        kc, oracle = KeyCounter(), collections.Counter()
        for _ in range(rng.integers(0, 6)):
            keys = rng.integers(-5, 50, rng.integers(0, 40)) * (1 << int(rng.integers(0, 40)))
            kc.add(keys)
            oracle.update(keys.tolist())
        for _ in range(trial % 3):
            other = KeyCounter()
            keys = rng.integers(0, 30, 25)
            other.add(keys)
            other.add(keys[:7])
            oracle.update(keys.tolist() + keys[:7].tolist())
            kc.merge(other)
        k, c = kc.result()
        assert k.tolist() == sorted(oracle) and c.tolist() == [oracle[x] for x in sorted(oracle)], trial
        assert k.dtype == np.int64 and c.dtype == np.int64


def test_key_counter_select_is_the_result_restricted_and_leaves_the_counter_whole():
    from moelab.analysis.common import KeyCounter

    rng = np.random.default_rng(4)
    kc = KeyCounter()
    for _ in range(5):
        kc.add((rng.integers(0, 6, 200) << 48) | rng.integers(0, 40, 200))
    chunks = len(kc._chunks)
    keys, counts = kc.select(lambda k: (k >> 48) % 3 == 1)
    assert len(kc._chunks) == chunks  # nothing merged in place
    all_keys, all_counts = kc.result()
    keep = (all_keys >> 48) % 3 == 1
    assert np.array_equal(keys, all_keys[keep]) and np.array_equal(counts, all_counts[keep])
    none = kc.select(lambda k: k < 0)
    assert len(none[0]) == 0 and none[0].dtype == np.int64
