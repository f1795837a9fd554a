"""The chunked LM loss against the full-logits cross-entropy (F.cross_entropy on sliced logits)."""

import pytest
import torch
import torch.nn.functional as F

from moelab import ModelConfig, build_model
from moelab.model.config import MoEConfig
from moelab.model.losses import chunked_lm_loss, shifted_labels


def full_loss(h_BSD, w_VD, labels_BS):
    logits = (h_BSD @ w_VD.t()).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, w_VD.shape[0]), labels_BS[:, 1:].reshape(-1),
                           ignore_index=-100)


def test_shifted_labels_hand_worked():
    y = torch.tensor([[5, 6, 7], [1, -100, 3]])
    assert shifted_labels(y).tolist() == [[6, 7, -100], [-100, 3, -100]]


@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_chunked_equals_full_loss_and_grads(chunk):
    g = torch.Generator().manual_seed(0)
    B, S, D, V = 3, 7, 16, 41
    h = torch.randn(B, S, D, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(V, D, generator=g).mul(0.3).requires_grad_()
    y = torch.randint(0, V, (B, S), generator=g)
    y[0, 3] = y[2, 1] = -100  # ignored targets in the middle
    ref = full_loss(h, w, y)
    gh_ref, gw_ref = torch.autograd.grad(ref * 1.7, (h, w))
    got = chunked_lm_loss(h, w, y, chunk_tokens=chunk)
    gh, gw = torch.autograd.grad(got * 1.7, (h, w))
    assert abs(float(got.detach()) - float(ref.detach())) < 1e-6
    torch.testing.assert_close(gh, gh_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(gw, gw_ref, atol=1e-6, rtol=0)


def test_all_ignored_is_nan_like_cross_entropy():
    h, w = torch.randn(1, 3, 4), torch.randn(5, 4)
    y = torch.full((1, 3), -100)
    assert torch.isnan(chunked_lm_loss(h, w, y)) and torch.isnan(full_loss(h, w, y))


def small_model(tie):
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=32,
                      tie_embeddings=tie, moe=MoEConfig(num_experts=4, top_k=2, moe_every=1, expert_hidden=32,
                                                        num_shared_experts=1))
    return build_model(cfg, seed=0)


@pytest.mark.parametrize("tie", [True, False])
def test_model_chunked_path_equals_full_path(tie):
    """The model's training path (return_logits=False) gives the same loss and every parameter's grad."""
    model = small_model(tie)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    full = model(ids, labels=ids)
    grads_full = torch.autograd.grad(full.loss, list(model.parameters()), allow_unused=True)
    chunk = model(ids, labels=ids, return_logits=False)
    assert chunk.logits is None
    grads_chunk = torch.autograd.grad(chunk.loss, list(model.parameters()), allow_unused=True)
    assert abs(float(chunk.loss.detach()) - float(full.loss.detach())) < 1e-6
    for (name, _), a, b in zip(model.named_parameters(), grads_full, grads_chunk):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)


def test_bf16_autocast_close_to_full():
    model = small_model(True)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids, labels=ids).loss
        chunk = model(ids, labels=ids, return_logits=False).loss
    assert chunk.dtype == torch.float32
    assert abs(float(chunk.detach()) - float(full.detach())) < 2e-2
