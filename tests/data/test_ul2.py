import numpy as np
import pytest

from moelab.config import MoelabError
from moelab.data.objectives import IGNORE_INDEX
from moelab.data.ul2 import (UL2_MIXTURE, Denoiser, UL2Sampler, max_segment_length, noise_span_counts,
                             prefix_lm_example, random_segmentation, random_spans_noise_mask,
                             span_corruption_example)

SENTINELS = list(range(100, 200))
MODE = 4


class ReversingRng:
    """A stand-in generator whose shuffle reverses, so the segmentation can be worked by hand."""

    def shuffle(self, a):
        a[:] = a[::-1].copy()


def test_noise_span_counts_hand_worked():
    assert noise_span_counts(100, 0.15, 3) == (15, 5)
    assert noise_span_counts(10, 0.15, 3) == (2, 1)  # round(1.5) = 2
    assert noise_span_counts(100, 0.5, 64) == (50, 1)
    assert noise_span_counts(2, 0.15, 3) == (1, 1)  # at least one noise token
    assert noise_span_counts(7, 0.5, 3) == (4, 1)  # round(3.5) = 4: halves go to even, like tf.round
    assert noise_span_counts(5, 0.5, 1) == (2, 2)  # round(2.5) = 2
    assert noise_span_counts(6, 0.5, 1) == (3, 3)


def test_noise_mask_hand_worked():
    # 10 tokens at rate .3 and mean span 1.5: 3 noise tokens in 2 spans, 7 non-noise in 2 spans.
    # Noise: gaps [T, F] reversed -> [F, T] -> segments [2, 1]. Non-noise: [T, F, F, F, F, F] reversed
    # -> the new segment starts at the last item -> [6, 1]. Interleaved: 6 keep, 2 noise, 1 keep, 1 noise.
    mask = random_spans_noise_mask(10, 0.3, 1.5, ReversingRng())
    assert mask.astype(int).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0, 1]


def test_span_corruption_example_hand_worked():
    tokens = np.arange(10, 20)
    mask = np.array([0, 0, 0, 0, 0, 0, 1, 1, 0, 1], bool)
    ex = span_corruption_example(tokens, mask, MODE, SENTINELS)
    inputs = [10, 11, 12, 13, 14, 15, 100, 18, 101]
    targets = [100, 16, 17, 101, 19]
    assert ex.ids.tolist() == [MODE] + inputs + targets
    assert ex.labels.tolist() == [IGNORE_INDEX] * 10 + targets
    # Each position's source token in the segment; sentinels stand for the first token of their span.
    assert ex.src.tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 8, 9, 6, 6, 7, 9, 9]
    assert ex.is_text.astype(int).tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1]


def test_prefix_lm_example_hand_worked():
    ex = prefix_lm_example(np.array([7, 8, 9, 10]), split=1, mode_id=MODE)
    assert ex.ids.tolist() == [MODE, 7, 8, 9, 10]
    assert ex.labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 8, 9, 10]
    assert ex.is_text.tolist() == [False, True, True, True, True]


def test_max_segment_length_hand_worked():
    prefix, nlu3 = UL2_MIXTURE[0], UL2_MIXTURE[1]
    assert max_segment_length(32, prefix, 100) == 31
    # n = 29: 4 noise tokens in 1 span -> 1 + 29 + 2 = 32 fits; n = 30: round(4.5) = 4, 33 does not.
    assert max_segment_length(32, nlu3, 100) == 29
    # With 2 sentinels, (3, .5) spans stay <= 2: n = 14 has 7 noise in round(7/3) = 2 spans;
    # n = 15 has round(7.5) = 8 noise in 3 spans.
    assert max_segment_length(1000, Denoiser("x", "[NLG]", 3, 0.5, 1), 2) == 14
    assert max_segment_length(3, nlu3, 100) == 0


def test_random_masks_have_the_right_shape_of_spans():
    rng = np.random.default_rng(0)
    for length in (2, 3, 10, 57, 300):
        for d in UL2_MIXTURE[1:]:
            mask = random_spans_noise_mask(length, d.rate, d.mean_span, rng)
            num_noise, num_spans = noise_span_counts(length, d.rate, d.mean_span)
            assert len(mask) == length and mask.sum() == num_noise
            starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
            assert len(starts) == num_spans and not mask[0] and mask[-1]
    lengths = random_segmentation(20, 6, rng)
    assert lengths.sum() == 20 and len(lengths) == 6 and lengths.min() >= 1


def reconstruct(ids, labels, sentinels):
    """Rebuild the original segment from one example's inputs and targets."""
    targets_at = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
    inputs, targets = ids[1:targets_at], ids[targets_at:]
    spans, current = {}, None
    for t in targets:
        if t in sentinels:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs:
        out.extend(spans.pop(t) if t in sentinels else [t])
    assert not spans  # every target span was used by exactly one sentinel
    return out


def test_span_corruption_reconstructs_the_original():
    rng = np.random.default_rng(1)
    sentinels = set(SENTINELS)
    for trial in range(50):
        tokens = rng.integers(200, 1000, size=int(rng.integers(2, 400)))
        d = UL2_MIXTURE[1 + trial % 5]
        mask = random_spans_noise_mask(len(tokens), d.rate, d.mean_span, rng)
        if mask.sum() and np.cumsum(mask & ~np.r_[False, mask[:-1]])[-1] <= len(SENTINELS):
            ex = span_corruption_example(tokens, mask, MODE, SENTINELS)
            assert reconstruct(ex.ids, ex.labels, sentinels) == tokens.tolist()


def examples(batch, mode_ids):
    """(row, begin, end) of each packed example, found by its mode token."""
    out = []
    ids = batch["input_ids"].numpy()
    for row in range(ids.shape[0]):
        begins = np.flatnonzero(np.isin(ids[row], mode_ids))
        ends = list(begins[1:]) + [int((batch["denoiser"][row] >= 0).sum())]
        out += [(row, int(b), int(e)) for b, e in zip(begins, ends)]
    return out


def test_ul2_batches_rebuild_corpus_segments(small_corpus):
    c = small_corpus
    sampler = UL2Sampler(c, seq_len=64, batch_size=8, seed=3)
    batch = sampler.batch(0)
    assert batch["denoiser"].shape == (8, 64)
    sentinels = set(c.sentinel_ids)
    found = examples(batch, list(c.mode_ids.values()))
    assert len(found) >= 8
    for row, b, e in found:
        ids, labels = batch["input_ids"][row, b:e].numpy(), batch["labels"][row, b:e].numpy()
        d = UL2_MIXTURE[int(batch["denoiser"][row, b])]
        assert ids[0] == c.mode_ids[d.mode] and labels[0] == IGNORE_INDEX
        segment = ids[1:] if d.rate == 0 else reconstruct(ids, labels, sentinels)
        # The segment is a window of the corpus, starting at its first text token.
        start = c.doc_start[batch["doc"][row, b + 1]] + batch["pos"][row, b + 1]
        assert list(segment) == c.tokens[start:start + len(segment)].tolist()
        assert (batch["pos"][row, b:e][~np.isin(ids, list(sentinels) + [ids[0]])] >= 0).all()
    assert torch_equal(sampler.batch(0), batch) and not torch_equal(sampler.batch(1), batch)


def torch_equal(a, b):
    return all((a[k] == b[k]).all() for k in a)


def test_mixture_and_corruption_rates_on_average(small_corpus):
    c = small_corpus
    sampler = UL2Sampler(c, seq_len=96, batch_size=32, seed=0)
    counts = np.zeros(len(UL2_MIXTURE))
    noise, total = np.zeros(len(UL2_MIXTURE)), np.zeros(len(UL2_MIXTURE))
    for step in range(25):
        batch = sampler.batch(step)
        for row, b, e in examples(batch, list(c.mode_ids.values())):
            which = int(batch["denoiser"][row, b])
            counts[which] += 1
            labels = batch["labels"][row, b:e].numpy()
            text_targets = ((labels != IGNORE_INDEX) & ~np.isin(labels, c.sentinel_ids)).sum()
            noise[which] += text_targets
            total[which] += (batch["pos"][row, b:e] >= 0).sum() if which else 0
    share = counts / counts.sum()
    assert abs(share[0] - 0.5) < 0.05 and all(abs(s - 0.1) < 0.03 for s in share[1:])
    for which, d in enumerate(UL2_MIXTURE[1:], 1):
        assert abs(noise[which] / total[which] - d.rate) < 0.02, d.name


def test_ul2_needs_mode_tokens_and_sentinels(small_corpus, monkeypatch):
    monkeypatch.setattr(small_corpus, "mode_ids", {})
    with pytest.raises(MoelabError, match="UL2 needs mode tokens"):
        UL2Sampler(small_corpus, seq_len=32, batch_size=2)
