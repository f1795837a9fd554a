"""The atomics-free dispatch/combine (model/dispatch.py) against the naive per-expert loop."""

import pytest
import torch

import moelab.model.experts as experts_mod
from moelab import build_model
from moelab.model.capacity import drop_mask
from moelab.model.dispatch import permutation
from moelab.model.experts import GroupedExperts, naive_experts_forward
from moelab.model.routers import top_k_stable


def _setup(E, K, T=41, D=16, Fh=24, seed=0, skew=False, drop=False, ties=False):
    g = torch.Generator().manual_seed(seed)
    ex = GroupedExperts(E, D, Fh, "swiglu", init_std=0.2, out_std=0.2)
    ex.combine = "gather"
    x = torch.randn(T, D, generator=g)
    logits = torch.randn(T, E, generator=g)
    if skew:  # some experts get no token at all
        logits[:, : E // 2] -= 100
    if ties:  # exact ties in every row, and identical tokens competing for capacity
        logits = logits.round(decimals=0)
        x[1::3] = x[0::3][: x[1::3].shape[0]]
    probs = logits.softmax(-1)
    ids = top_k_stable(probs, K)
    w = probs.gather(1, ids)
    keep = None
    if drop:
        keep = ~drop_mask(ids, w, E, 0.6, min_capacity=1)
        assert (~keep).any()
        w = w.masked_fill(~keep, 0.0)
    return ex, x, ids, w, keep


def _values_and_grads(fn, ex, x, ids, w, keep):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, ids, w, keep)
    # A random cotangent, not y.sum(): every output element gets its own weight.
    ct = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    return (y, *torch.autograd.grad((y * ct).sum(), [x, w, ex.w_in_EDX, ex.w_out_EFD]))


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("E, K, drop, skew, ties", [(4, 1, False, False, False), (4, 1, True, True, False),
                                                    (8, 2, True, False, False), (8, 2, False, True, True),
                                                    (16, 6, True, True, False), (16, 6, True, False, True),
                                                    (6, 6, False, False, False)])
def test_gather_combine_matches_the_naive_loop_in_values_and_every_gradient(monkeypatch, kernel, E, K,
                                                                            drop, skew, ties):
    if not kernel:
        monkeypatch.setattr(experts_mod, "_grouped_mm_works", lambda *a: False)
    ex, x, ids, w, keep = _setup(E, K, skew=skew, drop=drop, ties=ties)
    got = _values_and_grads(ex, ex, x, ids, w, keep)
    want = _values_and_grads(lambda *a: naive_experts_forward(ex, *a), ex, x, ids, w, keep)
    for name, a, b in zip(["y", "x", "weights", "w_in", "w_out"], got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    if skew:
        assert (torch.bincount(ids[keep] if drop else ids.reshape(-1), minlength=E) == 0).any()


def test_permutation_is_a_permutation_with_a_pad_row_for_dropped_choices():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    keep = torch.tensor([[True, True], [True, False], [True, True], [False, True]])
    order, inv, offs = permutation(ids, keep, 3)
    # Kept choices by expert, token order within one: e0 <- (0,1) (1,0); e1 <- (2,1); e2 <- (0,0) (2,0) (3,1)
    assert order.tolist() == [1, 2, 5, 0, 4, 7]
    assert offs.tolist() == [2, 3, 6]
    assert inv.tolist() == [[3, 0], [1, 6], [4, 2], [6, 5]]  # 6 = the zero pad row, for dropped ones


def _graph_nodes(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        f = stack.pop()
        if f is not None and f not in seen:
            seen.add(f)
            stack.extend(n for n, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


def test_no_scatter_in_the_gather_path_and_the_index_add_path_has_one():
    """IndexSelectBackward / IndexBackward / IndexAddBackward are the scatter-adds this path removes."""
    ex, x, ids, w, keep = _setup(8, 2, drop=True)
    x = x.requires_grad_()
    scatters = {"IndexSelectBackward0", "IndexBackward0", "IndexAddBackward0", "IndexPutBackward0"}
    assert not _graph_nodes(ex(x, ids, w, keep)) & scatters
    ex.combine = "index_add"
    assert _graph_nodes(ex(x, ids, w, keep)) & scatters


def test_gather_combine_is_bitwise_reproducible_and_sums_ranks_in_fp32():
    ex, x, ids, w, keep = _setup(16, 6, drop=True)
    ex = ex.to(torch.bfloat16)
    xb = x.bfloat16()
    a, b = ex(xb, ids, w, keep), ex(xb, ids, w, keep)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    # Independent reference: each kept choice's expert output, weighted and summed in fp32 rank order.
    want = torch.zeros(x.shape)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            if keep[t, k]:
                want[t] += w[t, k] * ex.expert_output(xb[t:t + 1], int(ids[t, k]))[0].float()
    torch.testing.assert_close(a, want.bfloat16(), atol=0, rtol=0)


def _small_model(router, **moe):
    from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
    base = dict(num_experts=6, top_k=2, moe_every=1, expert_hidden=16, num_shared_experts=1,
                capacity_factor_train=0.8)
    base.update(moe)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=64,
                      moe=MoEConfig(router=RouterConfig(**router), **base))
    return build_model(cfg)


@pytest.mark.parametrize("router", [dict(kind="linear"), dict(kind="mlp", hidden=8), dict(kind="cosine", hidden=8),
                                    dict(kind="rmoe", hidden=8), dict(kind="hash"),
                                    dict(kind="linear", score="sigmoid", n_group=3, topk_group=2,
                                         bias_balance=True, routed_scaling_factor=2.5, renormalize=True)])
def test_model_with_shared_experts_and_capacity_same_loss_and_gradients_either_combine(router):
    torch.manual_seed(0)
    model = _small_model(router)
    model.train()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    runs = []
    for mode in ("index_add", "gather"):
        for m in model.modules():
            if isinstance(m, GroupedExperts):
                m.combine = mode
        model.zero_grad()
        out = model(ids, labels=ids, return_routing=True)
        out.loss.backward()
        assert any(r.dropped_TK.any() for r in out.routing)
        runs.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None}))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-6, rtol=1e-6)
    assert runs[0][1].keys() == runs[1][1].keys()
    for n in runs[0][1]:
        torch.testing.assert_close(runs[0][1][n], runs[1][1][n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_gather_path_under_bf16_autocast_backpropagates_in_the_input_dtypes():
    """The GPU default runs under autocast: gradients come back in each leaf's dtype and near the fp32 ones."""
    ex, x, ids, w, keep = _setup(8, 2, drop=True, D=32, Fh=48)
    x32 = x.clone().requires_grad_()
    ref = torch.autograd.grad(ex(x32, ids, w, keep).sum(), [x32, ex.w_in_EDX])
    xa = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ex(xa, ids, w, keep)
    got = torch.autograd.grad(y.float().sum(), [xa, ex.w_in_EDX])
    assert [g.dtype for g in got] == [torch.float32, torch.float32]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
