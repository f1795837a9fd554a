"""The document shuffle behind the label nulls (analysis/units.py), against planted routings.

The planted traces route by a per-sequence topic (every token of a sequence shares its topic's expert
preference) plus the token ID; the domain is drawn apart from both, so the routing ignores it. A null
that keeps whole documents must then call the domain "not specialised" about as often as its level says,
and one that shuffles single tokens calls it specialised most of the time (the reason for this module).
"""

import numpy as np
import pytest

from moelab.analysis.specialization import domain_layer, expert_label_mi
from moelab.analysis.suite import analyze_all
from moelab.analysis.synthetic import clustered_batch
from moelab.analysis.tables import ShareAccumulator
from moelab.analysis.units import UnitAccumulator, assignments, unit_capacity

E, K, V, TOPICS = 8, 2, 50, 4


def topic_trace(seed: int, *, seqs: int = 64, seq_len: int = 128, layers: int = 1, domain_effect: float = 0.0,
                docs_per_seq: int = 1) -> dict:
    """Routing: top-k of topic[z_s] + token[v] (+ the domain's own preference times `domain_effect`); the
    domain of each document drawn at random (`synthetic.clustered_batch`)."""
    return clustered_batch(seed, num_seqs=seqs, seq_len=seq_len, num_layers=layers, num_experts=E, top_k=K,
                           topics=TOPICS, vocab=V, token_sd=1.0, domain_sd=domain_effect, docs_per_seq=docs_per_seq)


def label_p_values(batch: dict, layers: int = 1) -> dict[str, float]:
    r = analyze_all([batch], num_experts=[E] * layers, top_k=K, analyses=("specialisation",), labels=("domain",),
                    min_count=5, vocab_min_count=5, n_permutations=64, n_bootstrap=0)
    return {"specialisation": r["domain_specialisation:domain"].overall.p, "mi": r["mi:domain"].overall.p}


def test_a_label_the_routing_ignores_sits_at_its_null_under_sequence_topics():
    p = np.array([list(label_p_values(topic_trace(s)).values()) for s in range(40)])
    rejected = (p <= 0.05).sum(axis=0)
    assert (rejected <= 6).all(), f"document-shuffle null rejected {rejected} of 40 at 5% (expected about 2)"
    assert (p > 0.5).sum(axis=0).min() >= 12, "p-values piled up low: the null is too narrow"


def test_the_token_shuffle_calls_the_same_label_specialised():
    """The null this module replaces, on the same traces: what the planted test above would catch."""
    rejected = 0
    for s in range(20):
        b = topic_trace(s)
        acc = ShareAccumulator("domain", [E], K, folds=1)
        acc.update(b)
        tables = acc.result()
        pool = _pool(b)
        rejected += float(np.mean(domain_layer(tables, 0, pool=pool, n_permutations=64)["null"] >=
                                  domain_layer(tables, 0, pool=pool, n_permutations=64)["value"])) <= 0.05
    assert rejected >= 10


def _pool(batch):
    from moelab.analysis.resample import SetPoolAccumulator

    acc = SetPoolAccumulator([E], K)
    acc.update(batch)
    return acc.result()


def test_a_label_the_routing_follows_is_found():
    p = np.array([list(label_p_values(topic_trace(s, domain_effect=1.0)).values()) for s in range(8)])
    assert (p <= 1 / 65 + 1e-12).all(), p


def _units(batch, layers=1, **kw):
    acc = UnitAccumulator("domain", [E] * layers, K, **kw)
    acc.update(batch)
    return acc


def test_documents_sum_to_the_label_tables_and_a_permutation_moves_whole_documents():
    b = topic_trace(3, seqs=20, layers=2, docs_per_seq=3)
    units = _units(b, layers=2).result()
    assert units.complete and len(units.code_U) == 60 and units.seen_G.sum() == 60
    tables = ShareAccumulator("domain", [E] * 2, K, folds=1)
    tables.update(b)
    t = tables.result()
    for l in range(2):
        by_label = np.zeros((len(units.names), E), np.int64)
        np.add.at(by_label, units.code_U, units.all_ULE[:, l])
        order = [units.names.index(n) for n in t.group_names(l)]
        np.testing.assert_array_equal(by_label[order], t.counts[l])
        assert (units.top_ULE[:, l].sum(axis=1) == units.all_ULE[:, l].sum(axis=1) // K).all()
    for w in assignments(units, 5, seed=1):
        assert set(np.unique(w)) <= {0.0, 1.0} and (w.sum(axis=0) == 1).all()
        np.testing.assert_array_equal(w.sum(axis=1), np.bincount(units.code_U, minlength=len(units.names)))


def test_a_document_cut_between_batches_counts_once():
    b = topic_trace(4, seqs=6, seq_len=32)
    whole = _units(b).result()
    acc = UnitAccumulator("domain", [E], K)
    cut = 1000  # inside a sequence
    acc.update({k: (v[:cut] if isinstance(v, np.ndarray) and len(v) == len(b["seq"]) else v) for k, v in b.items()})
    acc.update({k: (v[cut:] if isinstance(v, np.ndarray) and len(v) == len(b["seq"]) else v) for k, v in b.items()})
    part = acc.result()
    assert part.complete and part.seen_G.sum() == 6
    np.testing.assert_array_equal(part.all_ULE, whole.all_ULE)


def test_a_sample_of_documents_is_the_same_whether_streamed_whole_or_in_parts():
    b = topic_trace(5, seqs=200, seq_len=16)
    one = _units(b, size=32).result()
    assert not one.complete and len(one.code_U) == 32 and one.seen_G.sum() == 200
    n = len(b["seq"])
    parts = []
    for lo, hi in ((0, n // 3 // (16 * K) * 16 * K), (n // 3 // (16 * K) * 16 * K, n)):  # cut at a sequence start
        parts.append(_units({k: (v[lo:hi] if isinstance(v, np.ndarray) and len(v) == n else v) for k, v in b.items()},
                            size=32))
    parts[0].merge(parts[1])
    merged = parts[0].result()
    np.testing.assert_array_equal(merged.code_U, one.code_U)
    np.testing.assert_array_equal(merged.all_ULE, one.all_ULE)
    np.testing.assert_array_equal(merged.seen_G, one.seen_G)
    assert merged.complete == one.complete


def test_a_sampled_null_draws_each_label_as_many_documents_as_it_has():
    b = topic_trace(6, seqs=300, seq_len=16)
    units = _units(b, size=64).result()
    for w in assignments(units, 3, seed=0):
        np.testing.assert_array_equal(w.sum(axis=1), units.seen_G)


def test_a_sampled_null_is_close_to_the_exact_one():
    b = topic_trace(7, seqs=400, seq_len=32)
    acc = ShareAccumulator("domain", [E], K, folds=1)
    acc.update(b)
    tables = acc.result()
    exact = domain_layer(tables, 0, n_permutations=200, units=_units(b).result())["null"]
    sampled = domain_layer(tables, 0, n_permutations=200, units=_units(b, size=100).result())["null"]
    assert abs(sampled.mean() - exact.mean()) < 0.3 * exact.std()
    assert 0.7 < sampled.std() / exact.std() < 1.4


def test_the_mi_null_is_the_document_shuffle_and_says_so():
    b = topic_trace(8)
    acc = ShareAccumulator("domain", [E], K, ranks="top1", folds=1)
    acc.update(b)
    mi = expert_label_mi(acc.result(), n_permutations=32, units=_units(b).result())
    assert "documents" in mi.overall.null
    assert mi.null_std[0] > 0 and len(mi.estimates) == 1


def test_capacity_follows_the_model_size():
    assert unit_capacity(2, 8) == 8192
    assert 256 <= unit_capacity(58, 256) < unit_capacity(16, 64) <= 8192


@pytest.mark.parametrize("missing", ["domain", "expert"])
def test_a_batch_without_a_needed_column_is_one_clear_error(missing):
    from moelab.config import MoelabError

    b = topic_trace(9, seqs=2, seq_len=8)
    del b[missing]
    with pytest.raises(MoelabError, match=missing):
        _units(b)


def test_document_counts_stay_int32_through_merges():
    parts = [_units(topic_trace(s, seqs=8)) for s in (10, 11)]
    parts[1].seq = parts[1].seq + 100  # other sequences
    parts[0].merge(parts[1])
    units = parts[0].result()
    assert units.all_ULE.dtype == np.int32 and units.top_ULE.dtype == np.int32
