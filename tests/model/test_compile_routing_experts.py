"""Experts inside a compiled region: torch._grouped_mm only in the dtypes its fake kernel takes.

torch 2.9-2.14's meta function of `_grouped_mm` accepts bf16 only (2.15's takes fp32 too), while the real
CPU (and CUDA) kernels run fp32, so an fp32 block under `train.compile=true` stopped with "Expected inputs
of BF16 type". The strategy now asks, while dynamo traces, whether the fake kernel takes the dtype, and
otherwise runs the per-expert loop (a graph break at its host sync, not a failure).
"""

import pytest
import torch
import torch._dynamo as dynamo

import moelab.model.experts as experts_mod
from moelab.model.experts import GroupedExperts, naive_experts_forward


def test_the_strategy_leaves_the_kernel_only_while_compiling_a_dtype_it_cannot_trace(monkeypatch):
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(2, 16, 16)
    monkeypatch.setattr(experts_mod, "_grouped_mm_works", lambda *a: True)  # the real kernel runs here
    for traceable, compiling, want in [(False, True, "loop"), (True, True, "grouped"), (False, False, "grouped"),
                                       (True, False, "grouped")]:
        monkeypatch.setattr(experts_mod, "_grouped_mm_traceable", lambda dtype, t=traceable: t)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        assert experts_mod.choose_strategy(x, w) == want, (traceable, compiling)


def test_this_torch_traces_grouped_mm_in_bf16():
    assert experts_mod._grouped_mm_traceable(torch.bfloat16)


def _fwd_bwd(ex, x, ids, w, fn=None):
    x = x.clone().requires_grad_()
    y = (fn if fn is not None else ex)(x, ids, w)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    return (y, *torch.autograd.grad((y * g).sum(), [x, ex.w_in_EDX, ex.w_out_EFD]))


@pytest.mark.parametrize("combine", ["index_add", "gather"])
def test_fp32_experts_compile_and_equal_the_naive_loop(monkeypatch, combine):
    # On a torch whose fake kernel takes fp32 (2.15) the compiled block runs the grouped kernel itself:
    # the values are checked there too, and the negative control below (the fallback) only where it applies.
    traceable = experts_mod._grouped_mm_traceable(torch.float32)
    if not experts_mod._grouped_mm_works("cpu", torch.float32):
        pytest.skip("no CPU _grouped_mm in this torch")
    g = torch.Generator().manual_seed(0)
    ex = GroupedExperts(4, 16, 16, "swiglu", 0.2, 0.2)
    ex.combine = combine
    x = torch.randn(12, 16, generator=g)
    w_TK, ids_TK = torch.rand(12, 4, generator=g).topk(2, dim=-1)
    dynamo.reset()
    got = _fwd_bwd(ex, x, ids_TK, w_TK, torch.compile(ex, backend="aot_eager"))
    want = _fwd_bwd(ex, x, ids_TK, w_TK, lambda *a: naive_experts_forward(ex, *a))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if traceable:
        dynamo.reset()
        return
    # Without the fallback the same compile fails on the fake kernel: the fallback is what makes it run.
    monkeypatch.setattr(experts_mod, "_grouped_mm_traceable", lambda dtype: True)
    dynamo.reset()
    with pytest.raises(Exception, match="BF16|BFloat16"):  # torch 2.13's message, then 2.14's
        _fwd_bwd(ex, x, ids_TK, w_TK, torch.compile(ex, backend="aot_eager"))
    dynamo.reset()
