import pytest
import torch

import moelab.model.experts as experts_mod
from moelab.model.capacity import drop_mask
from moelab.model.cpu_experts import CPU_EXPERTS_ENV
from moelab.model.experts import GatedFFN, GroupedExperts, gated_activation, naive_experts_forward


def _setup(E, K, T=37, D=16, Fh=24, kind="swiglu", seed=0, skew=False, drop=False):
    g = torch.Generator().manual_seed(seed)
    ex = GroupedExperts(E, D, Fh, kind, init_std=0.2, out_std=0.2)
    x = torch.randn(T, D, generator=g)
    logits = torch.randn(T, E, generator=g)
    if skew:  # leave some experts with no tokens at all
        logits[:, : E // 2] -= 100
    probs = logits.softmax(-1)
    w, ids = probs.topk(K, dim=-1)
    keep = None
    if drop:
        keep = ~drop_mask(ids, w, E, 0.6, min_capacity=1)
        assert (~keep).any()
        w = w.masked_fill(~keep, 0.0)
    return ex, x, ids, w, keep


@pytest.mark.parametrize("E, K", [(4, 1), (8, 2), (16, 6)])
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("skew", [False, True])
def test_grouped_matches_naive_loop_forward_and_grads(E, K, drop, skew):
    ex, x, ids, w, keep = _setup(E, K, skew=skew, drop=drop)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y1 = ex(x1, ids, w1, keep)
    grads1 = torch.autograd.grad(y1.square().sum(), [x1, w1, ex.w_in_EDX, ex.w_out_EFD])
    y2 = naive_experts_forward(ex, x2, ids, w2, keep)
    grads2 = torch.autograd.grad(y2.square().sum(), [x2, w2, ex.w_in_EDX, ex.w_out_EFD])
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if skew:
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        assert (counts == 0).any()


def test_loop_fallback_equals_grouped_kernel(monkeypatch):
    ex, x, ids, w, keep = _setup(8, 2, drop=True)
    fast = ex(x, ids, w, keep)
    monkeypatch.setattr(experts_mod, "_grouped_mm_works", lambda *a: False)
    slow = ex(x, ids, w, keep)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("strategy", ["grouped", "loop", "onednn"])
@pytest.mark.parametrize("E, K, T, drop, skew", [(8, 2, 37, True, False), (16, 6, 37, False, True),
                                                 (4, 1, 37, False, False), (4, 2, 301, False, True),
                                                 (5, 2, 403, True, False)])
def test_every_strategy_matches_the_naive_loop_in_inference(monkeypatch, strategy, E, K, T, drop, skew):
    """T 301 and 403 give experts 17-400 rows: oneDNN's bucket windows pad, past the end too."""
    if strategy == "onednn" and not experts_mod._onednn_works():
        pytest.skip("this torch has no oneDNN linear")
    ex, x, ids, w, keep = _setup(E, K, T=T, drop=drop, skew=skew, D=32, Fh=48)
    with torch.no_grad():
        want = naive_experts_forward(ex, x, ids, w, keep)
        monkeypatch.setattr(experts_mod, "choose_strategy", lambda *a: strategy)
        got = ex(x, ids, w, keep)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_onednn_is_chosen_only_where_no_gradient_is_needed(monkeypatch):
    ex, x, ids, w, keep = _setup(8, 2, D=32, Fh=48)
    x_grad = x.clone().requires_grad_()
    monkeypatch.setenv(CPU_EXPERTS_ENV, "onednn")
    assert experts_mod.choose_strategy(x_grad, ex.w_in_EDX) in ("grouped", "loop")
    with torch.no_grad():
        inference = experts_mod.choose_strategy(x_grad, ex.w_in_EDX)
        assert inference == ("onednn" if experts_mod._onednn_works() else "grouped")
        # bf16 (or any non-fp32) operands stay on torch's own kernels
        assert experts_mod.choose_strategy(x.bfloat16(), ex.w_in_EDX.bfloat16()) != "onednn"
        monkeypatch.setenv(CPU_EXPERTS_ENV, "matmul")
        assert experts_mod.choose_strategy(x_grad, ex.w_in_EDX) == "grouped"


def _slowed(fn, seconds):
    def slow(*a, **k):
        import time

        time.sleep(seconds)
        return fn(*a, **k)
    return slow


@pytest.fixture
def one_thread():
    """With two threads a tiny oneDNN call took ~8 ms while other work held the second core (its threads
    wait for each other): more than a planted 20 ms slowdown can outweigh. One thread times the kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("slow", ["onednn", "matmul", None])
def test_the_cpu_inference_kernel_is_the_one_measured_faster_once_per_shape_and_row_class(monkeypatch, slow,
                                                                                          one_thread):
    """A planted answer: the strategy made 20 ms slower per call loses; with neither slowed, whichever
    wins is kept for that (E, A, B, row class), and a later call of the same class measures nothing."""
    if not experts_mod._onednn_works():
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(experts_mod, "_CPU_CHOICE", {})
    monkeypatch.delenv(CPU_EXPERTS_ENV, raising=False)
    if slow == "onednn":
        monkeypatch.setattr(experts_mod, "_onednn_loop", _slowed(experts_mod._onednn_loop, 0.02))
    elif slow == "matmul":
        monkeypatch.setattr(experts_mod, "_grouped", _slowed(experts_mod._grouped, 0.02))
    ex, x, ids, w, keep = _setup(8, 2, T=64, D=32, Fh=48)
    rows = x.repeat(2, 1)  # 128 rows over 8 experts: row class 16
    with torch.no_grad():
        chosen = experts_mod.choose_strategy(rows, ex.w_in_EDX)
        if slow is not None:
            assert chosen == ("grouped" if slow == "onednn" else "onednn")
        assert list(experts_mod._CPU_CHOICE) == [(8, 32, 96, 16)]
        assert experts_mod._CPU_CHOICE[(8, 32, 96, 16)] == (chosen == "onednn")
        # the probe's packed weights are not left on a parameter that will not use them
        assert hasattr(ex.w_in_EDX, "_onednn_packed") == (chosen == "onednn" and experts_mod._packing_pays(32, 96))
        # the layer's output is the naive loop's whichever kernel won (its second matmul measures its own)
        torch.testing.assert_close(ex(x, ids, w, keep), naive_experts_forward(ex, x, ids, w, keep),
                                   atol=1e-5, rtol=1e-5)
        assert set(experts_mod._CPU_CHOICE) == {(8, 32, 96, 16), (8, 48, 32, 16)}
        monkeypatch.setattr(experts_mod, "onednn_measured_faster", lambda *a: pytest.fail("measured twice"))
        assert experts_mod.choose_strategy(rows[:100], ex.w_in_EDX) == chosen  # 12.5 rows: still class 16


def test_row_classes_and_a_bad_kernel_setting():
    from moelab.config import MoelabError

    assert [experts_mod.row_class(m) for m in (0, 1, 1.4, 1.5, 16, 22, 23, 384, 5000)] == \
        [1, 1, 1, 2, 16, 16, 32, 512, 4096]  # nearest in log2: 16 * sqrt(2) = 22.6
    ex, x, ids, w, keep = _setup(8, 2, D=32, Fh=48)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setenv(CPU_EXPERTS_ENV, "mkl")
        if experts_mod._onednn_works():
            with pytest.raises(MoelabError, match="MOELAB_CPU_EXPERTS='mkl' is not one of auto, onednn, matmul"):
                experts_mod.choose_strategy(x, ex.w_in_EDX)


def test_interleaved_medians_run_in_turn_after_a_warm_up_and_take_the_median(monkeypatch):
    order = []
    # A fake clock: each call's time is what the variant planted for that round, so the median is known.
    planted = {"a": [99, 5, 1, 3], "b": [99, 2, 8, 4]}  # round 0 is the warm-up and is not counted
    now = [0.0]

    def call(name):
        def go():
            order.append(name)
            now[0] += planted[name][len([n for n in order if n == name]) - 1]
        return go

    monkeypatch.setattr(experts_mod.time, "perf_counter", lambda: now[0])
    took = experts_mod.interleaved_medians({"a": call("a"), "b": call("b")}, rounds=3)
    assert order == ["a", "b"] * 4
    assert took == {"a": 3, "b": 4}


def test_no_timing_while_dynamo_traces(monkeypatch):
    monkeypatch.setattr(experts_mod, "_CPU_CHOICE", {})
    monkeypatch.delenv(CPU_EXPERTS_ENV, raising=False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(experts_mod, "onednn_measured_faster", lambda *a: pytest.fail("timed while tracing"))
    ex, x, ids, w, keep = _setup(8, 2, D=32, Fh=48)
    assert experts_mod._cpu_prefers_onednn(x, ex.w_in_EDX) and experts_mod._CPU_CHOICE == {}


def test_row_buckets_bound_padding_and_the_number_of_distinct_counts():
    buckets = [experts_mod.row_bucket(m) for m in range(1, 20001)]
    assert buckets[:16] == list(range(1, 17))
    assert all(m <= b <= m * 1.125 for m, b in zip(range(1, 20001), buckets))
    assert all(a <= b for a, b in zip(buckets, buckets[1:]))
    assert len(set(buckets)) <= 16 + 8 * 11  # exact to 16, then 8 per power of two up to 2^15


def test_odd_sizes_use_the_loop_and_stay_correct():
    ex, x, ids, w, keep = _setup(4, 2, D=6, Fh=5)
    torch.testing.assert_close(ex(x, ids, w), naive_experts_forward(ex, x, ids, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["swiglu", "geglu", "openmoe"])
def test_ffn_kinds_have_the_documented_form(kind):
    g = torch.Generator().manual_seed(0)
    ffn = GatedFFN(8, 6, kind, 0.3, 0.3)
    x = torch.randn(5, 8, generator=g)
    h = x @ ffn.w_in_DX
    if kind == "swiglu":
        hidden = torch.nn.functional.silu(h[:, :6]) * h[:, 6:]
    elif kind == "geglu":
        hidden = torch.nn.functional.gelu(h[:, :6], approximate="tanh") * h[:, 6:]
    else:
        hidden = h[:, :6] * torch.nn.functional.silu(h[:, 6:12]) * h[:, 12:]
    torch.testing.assert_close(ffn(x), hidden @ ffn.w_out_FD)
    assert ffn.w_in_DX.numel() + ffn.w_out_FD.numel() == {"swiglu": 3, "geglu": 3, "openmoe": 4}[kind] * 8 * 6


def test_matrices_are_the_neurons_of_each_expert():
    ex = GroupedExperts(3, 8, 5, "swiglu", 0.3, 0.3)
    m = ex.matrices()
    x = torch.randn(4, 8)
    gate = x @ m["w_gate_EFD"][1].t()
    up = x @ m["w_up_EFD"][1].t()
    y = (torch.nn.functional.silu(gate) * up) @ m["w_down_EDF"][1].t()
    torch.testing.assert_close(y, ex.expert_output(x, 1))
    assert gated_activation(torch.zeros(2, 10), "swiglu").shape == (2, 5)


@pytest.mark.parametrize("E, K, T, drop", [(8, 2, 37, True), (4, 2, 301, False), (5, 2, 403, True)])
def test_prepacked_onednn_weights_match_the_naive_loop_and_follow_weight_updates(monkeypatch, E, K, T, drop):
    """Packed for a 16-row window, used for windows of 1-400 rows; an in-place update must repack."""
    if not experts_mod._onednn_works():
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(experts_mod, "_packing_pays", lambda *a: True)
    monkeypatch.setattr(experts_mod, "choose_strategy", lambda *a: "onednn")
    ex, x, ids, w, keep = _setup(E, K, T=T, drop=drop, D=32, Fh=48)
    with torch.no_grad():
        for _ in range(2):
            got = ex(x, ids, w, keep)
            monkeypatch.undo()
            want = naive_experts_forward(ex, x, ids, w, keep)
            monkeypatch.setattr(experts_mod, "_packing_pays", lambda *a: True)
            monkeypatch.setattr(experts_mod, "choose_strategy", lambda *a: "onednn")
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert ex.w_in_EDX._onednn_packed[0] == ex.w_in_EDX._version
            ex.w_in_EDX.mul_(-0.5)  # the second pass must see the new weights, not the cached packing


@pytest.mark.parametrize("compiled", [False, True])
def test_grouped_kernel_takes_an_expanded_gradient(compiled):
    """A sum's gradient is expanded (stride 0), which torch._grouped_mm's backward rejects; the kernel path
    hands it on contiguous, eagerly and inside a compiled graph (dynamic sizes, as a block's are)."""
    dtype = torch.bfloat16
    if not experts_mod._kernel_ok(torch.zeros(8, 16, dtype=dtype), torch.zeros(2, 16, 16, dtype=dtype)):
        pytest.skip("torch._grouped_mm does not run in bf16 here")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(3, 16, 16, generator=g).to(dtype).requires_grad_()
    counts = torch.tensor([5, 0, 19])

    def loss(x, w, counts):
        return experts_mod.grouped_mm(x, w, counts).sum()  # the sum of a bf16 tensor: its gradient is expanded

    fn = torch.compile(loss, backend="aot_eager", dynamic=True) if compiled else loss
    fn(x, w, counts).backward()
    # Reference: the same products as plain matmuls in fp32, expert by expert.
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    torch.cat([xs @ wr[e] for e, xs in enumerate(xr.split(counts.tolist()))]).sum().backward()
    torch.testing.assert_close(x.grad.float(), xr.grad, atol=0.1, rtol=2e-2)
    torch.testing.assert_close(w.grad.float(), wr.grad, atol=0.2, rtol=2e-2)


@pytest.mark.parametrize("strategy", ["grouped", "loop"])
def test_fp32_weights_under_bf16_autocast_run_the_experts_in_bf16(monkeypatch, strategy):
    """Autocast has no rule for torch._grouped_mm, so fp32 expert weights under bf16 autocast ran both expert
    products in fp32 (on CUDA, the kernel's per-expert fallback). They now run in the autocast dtype, as
    autocast runs a matmul, and equal the naive loop under the same autocast to bf16 tolerance; the fp32
    weights still get fp32 gradients."""
    if strategy == "grouped" and not experts_mod._kernel_ok(torch.zeros(8, 16, dtype=torch.bfloat16),
                                                              torch.zeros(2, 16, 16, dtype=torch.bfloat16)):
        pytest.skip("torch._grouped_mm does not run in bf16 here")
    monkeypatch.setattr(experts_mod, "choose_strategy", lambda *a: strategy)
    seen = []
    real = experts_mod.run_strategy

    def spy(name, x_NA, w_EAB, *rest):
        seen.append((x_NA.dtype, w_EAB.dtype))
        return real(name, x_NA, w_EAB, *rest)

    monkeypatch.setattr(experts_mod, "run_strategy", spy)
    ex, x, ids, w, keep = _setup(8, 2, T=64, D=16, Fh=32, drop=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ex(x, ids, w, keep)
        ref = naive_experts_forward(ex, x, ids, w, keep)
        y.float().square().sum().backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2
    assert y.dtype == x.dtype and ex.w_in_EDX.grad.dtype == ex.w_out_EFD.grad.dtype == torch.float32
    torch.testing.assert_close(y, ref.float(), atol=2e-2 * ref.abs().max().item(), rtol=0)
    with torch.no_grad():  # and not fp32: the fp32 output is further from it than bf16 rounding allows
        assert (ex(x, ids, w, keep) - y).abs().max() > 1e-4


def test_the_probes_carry_the_marker_torch_compilers_own_call_sets():
    """experts._mark_constant stands in for torch.compiler.assume_constant_result at import (which would
    import dynamo, 2 s at every start): it must set what the public call sets, nothing more or less."""
    import subprocess
    import sys

    from moelab.model.experts import _mark_constant

    def a():
        return 1

    def b():
        return 1

    assert vars(_mark_constant(a)) == vars(torch.compiler.assume_constant_result(b)) != {}
    code = "import sys, moelab.model.transformer; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # building a model does not load dynamo
