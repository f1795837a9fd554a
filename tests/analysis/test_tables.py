"""ShareAccumulator's count tables against a plain loop over the rows (a dict per layer), on the paths its
update takes: rows left out (turn -1, top1), group values past the dense tables (the sparse counter), the
fold split with a sample of groups, and batches cut anywhere."""

from collections import Counter

import numpy as np
import pytest

from moelab.analysis.resample import mix64
from moelab.analysis.tables import DENSE_GROUPS, ShareAccumulator

L, E, K, FOLDS = 3, 8, 2, 4


def rows(seed: int, n_tokens: int = 600, big: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seq = np.repeat(np.arange(n_tokens // 50), 50)
    token = rng.integers(0, 40, n_tokens)
    if big:  # past the dense tables: the sparse counter, and the fold sample hashed row by row
        token[rng.random(n_tokens) < 0.2] += DENSE_GROUPS + 5
    turn = rng.integers(-1, 3, n_tokens)
    tok = np.repeat(np.arange(n_tokens), L * K)
    return dict(seq=seq[tok], pos=(tok % 50).astype(np.int32), token=token[tok], turn=turn[tok].astype(np.int16),
                layer=np.tile(np.repeat(np.arange(L), K), n_tokens).astype(np.int16),
                rank=np.tile(np.arange(K), n_tokens * L).astype(np.int8),
                expert=rng.integers(0, E, n_tokens * L * K).astype(np.int16))


def naive(batch, group, ranks, folds, fold_sample):
    """(layer, fold, value, expert) -> count, one row at a time; fold = folds for the unsampled groups."""
    out = Counter()
    for i in range(len(batch["seq"])):
        v = int(batch[group][i])
        if v < 0 or (ranks == "top1" and batch["rank"][i] != 0):
            continue
        f = int(mix64(np.array([batch["seq"][i]]))[0] % np.uint64(folds)) if folds > 1 else 0
        if fold_sample > 1 and int(mix64(np.array([v]), 0x5A)[0] % np.uint64(fold_sample)) != 0:
            f = folds
        out[int(batch["layer"][i]), f, v, int(batch["expert"][i])] += 1
    return out


@pytest.mark.parametrize("group,ranks,folds,fold_sample,big", [
    ("token", "all", FOLDS, 3, True), ("token", "all", FOLDS, 3, False), ("token", "top1", FOLDS, 1, True),
    ("turn", "all", FOLDS, 1, False), ("turn", "all", 1, 1, False), ("pos", "top1", 1, 1, False)])
def test_counts_equal_a_loop_over_the_rows(group, ranks, folds, fold_sample, big):
    batch = rows(1, big=big)
    acc = ShareAccumulator(group, [E] * L, K, ranks=ranks, folds=folds, fold_sample=fold_sample)
    n = len(batch["seq"])
    for a, b in ((0, 777), (777, 778), (778, 2000), (2000, n)):  # cut inside tokens and sequences
        acc.update({k: v[a:b] for k, v in batch.items()})
    want = naive(batch, group, ranks, folds, fold_sample)
    got = Counter()
    for l in range(L):
        g, counts_GE, (fold_N, inv_N, expert_N, count_N), _ = acc.layer_result(l)
        unsplit = Counter({(l, int(g[i]), e): int(c) for i, e in zip(*np.nonzero(counts_GE)) for c in [counts_GE[i, e]]})
        for f, i, e, c in zip(fold_N, inv_N, expert_N, count_N):
            got[l, int(f), int(g[i]), int(e)] += int(c)
            unsplit[l, int(g[i]), int(e)] -= int(c)
        for (l_, v, e), c in unsplit.items():  # what the fold split did not take: one extra fold (or fold 0)
            if c:
                got[l_, folds if folds > 1 else 0, v, e] += c
    assert +got == +want and sum(want.values()) > 0


@pytest.mark.parametrize("budget", [None, 0])
@pytest.mark.parametrize("group,folds", [("pos", FOLDS), ("pos", 1), ("token", FOLDS)])
def test_parts_kept_apart_give_the_tables_of_one_pass(monkeypatch, group, folds, budget):
    """Workers' parts (packed, dense of other widths, sparse chunks) merged as the parent does: kept apart
    for the layers' jobs (the default) or added as they come (budget 0): the tables of one pass, bit for bit."""
    from moelab.analysis import tables

    if budget is not None:
        monkeypatch.setattr(tables, "PARTS_BUDGET", budget)
    rng = np.random.default_rng(3)
    batches = []
    for seed, n, width in ((1, 400, 9000), (2, 8000, 700), (3, 200, 20000)):
        b = rows(seed, n_tokens=n, big=group == "token")
        b["pos"] = rng.integers(0, width, n)[np.repeat(np.arange(n), L * K)].astype(np.int32)
        b["seq"] = b["seq"] + 1000 * seed
        batches.append(b)
    one, merged, kinds = ShareAccumulator(group, [E] * L, K, folds=folds), ShareAccumulator(group, [E] * L, K, folds=folds), set()
    for b in batches:
        one.update(b)
        part = ShareAccumulator(group, [E] * L, K, folds=folds)
        part.update(b)
        kinds |= {type(t).__name__ for t in part.for_transfer().dense.values()}
        merged.merge(part)
    if group == "pos":
        assert kinds == {"PackedCounts", "ndarray"}  # both kinds of part
    else:
        assert merged.counter.nbytes > 0  # the sparse counter's chunks too
    assert bool(merged.parts) == (budget is None)
    for l in range(L):
        want, got = one.layer_result(l), merged.layer_result(l)
        for w, g in zip([want[0], want[1], *want[2], want[3]], [got[0], got[1], *got[2], got[3]]):
            assert w.dtype == g.dtype and np.array_equal(w, g)
