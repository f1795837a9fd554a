"""Gated FFNs: the dense FFN, and the routed experts as one module of stacked weights.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token, N kept choices,
X = P * F, the fused input projection (P = 2 for SwiGLU/GeGLU, 3 for OpenMoE's released unit).

The fast path sorts the kept (token, expert) choices by expert and runs two grouped matrix multiplies by
one of three strategies, picked per call by `choose_strategy`: `grouped` (`torch._grouped_mm`, where this
torch and device take the operands), `loop` (a loop over contiguous per-expert slices) and, for
inference on CPU in fp32, `onednn` (a loop over oneDNN matmuls of bucket-sized row windows).
The combine is dispatch.py's gathers and fp32 rank-order sum (no atomics) off CPU, and the scatter-add
`index_add_` on CPU, where it measured faster. `naive_experts_forward` is the per-expert masked loop kept as the oracle for tests; each strategy is
tested against it.
"""

from __future__ import annotations

import logging
import math
import time
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.model.config import FFN_IN_PROJECTIONS
from moelab.model.cpu_experts import cpu_experts_mode
from moelab.model.dispatch import Dispatch, combine, permutation


def gated_activation(h_NX: torch.Tensor, kind: str) -> torch.Tensor:
    """Fused input projections -> hidden units. Neuron i reads column i of each F-wide slice."""
    if kind == "swiglu":
        gate, up = h_NX.chunk(2, dim=-1)
        return F.silu(gate) * up
    if kind == "geglu":
        gate, up = h_NX.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
    # OpenMoE's released unit: wi_0 split in halves (a, b), times a third projection x W1.
    a, b, up = h_NX.chunk(3, dim=-1)
    return a * F.silu(b) * up


class GatedFFN(nn.Module):
    """A dense gated FFN: y = act(x W_in) W_out. Also the shared expert."""

    def __init__(self, d_model: int, hidden: int, kind: str, init_std: float, out_std: float):
        super().__init__()
        self.kind = kind
        P = FFN_IN_PROJECTIONS[kind]
        self.w_in_DX = nn.Parameter(torch.randn(d_model, P * hidden) * init_std)
        self.w_out_FD = nn.Parameter(torch.randn(hidden, d_model) * out_std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return gated_activation(x_TD @ self.w_in_DX, self.kind) @ self.w_out_FD


@lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype): CUDA's kernel wants bf16 on recent GPUs, CPU's loops in any dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.zeros(8, 16, device=device_type, dtype=dtype)
        w = torch.zeros(2, 16, 16, device=device_type, dtype=dtype)
        torch._grouped_mm(x, w, offs=torch.tensor([4, 8], device=device_type, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


@lru_cache(maxsize=None)
def _grouped_mm_traceable(dtype: torch.dtype) -> bool:
    """Whether torch.compile can trace torch._grouped_mm in this dtype: its fake (meta) kernel, which
    compiled graphs run instead of the real one, accepts only bf16 in torch 2.9-2.14 (fp32 too from 2.15)
    even where the real CPU/CUDA kernel takes fp32, so an fp32 block would fail to compile."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        quiet = logging.getLogger("torch._subclasses.fake_tensor")  # a refusal is logged as a traceback
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            with FakeTensorMode():
                x, w = torch.empty(8, 16, dtype=dtype), torch.empty(2, 16, 16, dtype=dtype)
                torch._grouped_mm(x, w, offs=torch.empty(2, dtype=torch.int32))
        finally:
            quiet.setLevel(level)
        return True
    except Exception:  # noqa: BLE001  (any refusal, whatever its type, means "not traceable")
        return False


def _mark_constant(fn):
    """What torch.compiler.assume_constant_result does to `fn` (a marker dynamo reads), without importing
    dynamo: that import cost every moelab process about 2 s at start. `mark_probes_for_compile` applies the
    public call before moelab compiles anything; a test checks the marker is the one the public call sets."""
    fn._dynamo_marked_constant = True
    return fn


def mark_probes_for_compile() -> None:
    """Mark the probes with torch.compiler.assume_constant_result itself (compiling.compiled calls this)."""
    global _grouped_mm_ok
    mark = getattr(torch.compiler, "assume_constant_result", None)  # since 2.1; else the probes trace
    if mark is not None:
        _grouped_mm_ok = mark(_grouped_mm_ok)


@_mark_constant
def _grouped_mm_ok(device_type: str, dtype: torch.dtype, compiling: bool) -> bool:
    """The two probes, run eagerly even while dynamo traces the caller (a constant in the graph)."""
    return _grouped_mm_works(device_type, dtype) and (not compiling or _grouped_mm_traceable(dtype))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: torch._grouped_mm's backward rejects the
    expanded (stride-0) gradient of, say, a sum. A Function rather than a tensor hook: dynamo in torch 2.11
    lost a symbolic size when it traced the hook inside a compiled block."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _kernel_ok(x_NA: torch.Tensor, w_EAB: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands. On CPU fp32 it measured 2-4% faster than the slice
    loop below (it skips the loop's cat/split/stack copies in backward); see docs/PERFORMANCE.md."""
    align = 16 // x_NA.element_size()  # the kernel wants 16-byte aligned strides
    return (x_NA.dtype == w_EAB.dtype and x_NA.shape[1] % align == 0 and w_EAB.shape[2] % align == 0
            and _grouped_mm_ok(x_NA.device.type, x_NA.dtype, torch.compiler.is_compiling()))


def grouped_mm(x_NA: torch.Tensor, w_EAB: torch.Tensor, counts_E: torch.Tensor,
               counts_list: list[int] | None = None) -> torch.Tensor:
    """Rows of x sorted by expert times their expert's matrix: out[n] = x[n] @ w[expert(n)]."""
    if _kernel_ok(x_NA, w_EAB):
        return _grouped(x_NA, w_EAB, torch.cumsum(counts_E, 0, dtype=torch.int32), None)
    return _grouped(x_NA, w_EAB, None, counts_list if counts_list is not None else counts_E.tolist())


def _grouped(x_NA, w_EAB, offs_E, counts_list):
    """The kernel with int32 group ends offs_E, or (counts_list given) the loop over per-expert slices."""
    if counts_list is None:
        out = torch._grouped_mm(x_NA, w_EAB, offs=offs_E)
        return _ContiguousGrad.apply(out) if out.requires_grad else out
    # unbind, not w[e]: each w[e] would backpropagate a full-size zero gradient of all E experts
    # (this alone made the loop 2.4x faster at 64 experts).
    w_B = w_EAB.unbind(0)
    pieces = [xs @ w_B[e] for e, xs in enumerate(x_NA.split(counts_list)) if xs.shape[0]]
    if not pieces:
        return x_NA.new_zeros(0, w_EAB.shape[2])
    return torch.cat(pieces)


def sort_choices(expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, keep_TK: torch.Tensor | None,
                 num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept choices sorted by expert, token order within one: token ids [N], weights [N] and the int32
    end of each expert's rows [E] (the offsets torch._grouped_mm takes)."""
    K = expert_ids_TK.shape[1]
    ids_N = expert_ids_TK.reshape(-1)
    if keep_TK is not None:
        # Dropped choices get the sentinel expert E: the one sort groups the kept ones and moves the
        # dropped ones to the end, instead of a nonzero() and three gathers before the sort.
        ids_N = ids_N.masked_fill(~keep_TK.reshape(-1), num_experts)
    ids_sorted, order_N = torch.sort(ids_N, stable=True)
    # Group ends straight from the sorted ids, in int32: no bincount (a host sync on CUDA) and no cumsum.
    bounds_E = torch.arange(1, num_experts + 1, device=ids_N.device, dtype=ids_N.dtype)
    offs_E = torch.searchsorted(ids_sorted, bounds_E, out_int32=True)
    if keep_TK is not None:
        order_N = order_N[: int(offs_E[-1])]  # the kept count sizes every tensor after this
    # Flat choice n = t * K + k, so its token is n // K: no arange(T).repeat_interleave(K) to gather.
    return order_N // K, weights_TK.reshape(-1).index_select(0, order_N), offs_E


@lru_cache(maxsize=None)
def _onednn_works() -> bool:
    """Whether this torch exposes oneDNN's linear on dense tensors (an op inductor uses on CPU)."""
    try:
        # Fixed numbers, not randn: a probe must not move the global random stream.
        x, w = torch.arange(32.0).view(4, 8) / 32, torch.arange(128.0).view(8, 16) / 128
        y = torch.ops.mkldnn._linear_pointwise(x, w.t(), None, "none", [], "")
        return bool(torch.allclose(y, x @ w, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def choose_strategy(x_NA: torch.Tensor, w_EAB: torch.Tensor) -> str:
    """`onednn`, `grouped` or `loop` for rows x sorted by expert times stacked weights w.

    For inference on CPU in fp32 (oneDNN has no backward here), oneDNN or torch's matmul, whichever
    measured faster on this machine for this weight shape and about this many rows per expert
    (`onednn_measured_faster`): oneDNN took 0.55-1.01x torch matmul's time on an AMD EPYC, but 1.09-1.27x
    on an Intel Xeon at 384-1024 rows per expert while still 0.75x at decode sizes (docs/PERFORMANCE.md).
    `MOELAB_CPU_EXPERTS=onednn|matmul` fixes the choice (their sums round differently); `auto`, the
    default, measures once per weight shape and row class in a process."""
    needs_grad = torch.is_grad_enabled() and (x_NA.requires_grad or w_EAB.requires_grad)
    if (not needs_grad and x_NA.device.type == "cpu" and x_NA.dtype == w_EAB.dtype == torch.float32
            and _onednn_works() and _cpu_prefers_onednn(x_NA, w_EAB)):
        return "onednn"
    return matmul_strategy(x_NA, w_EAB)


def matmul_strategy(x_NA: torch.Tensor, w_EAB: torch.Tensor) -> str:
    """The strategy on torch's own matmul: the grouped kernel where it takes the operands, else the loop."""
    return "grouped" if _kernel_ok(x_NA, w_EAB) else "loop"


_CPU_CHOICE: dict[tuple[int, int, int, int], bool] = {}  # (E, A, B, row class) -> oneDNN measured faster


def _cpu_prefers_onednn(x_NA: torch.Tensor, w_EAB: torch.Tensor) -> bool:
    mode = cpu_experts_mode()
    if mode != "auto":
        return mode == "onednn"
    E, A, B = w_EAB.shape
    key = (E, A, B, row_class(x_NA.shape[0] / max(E, 1)))
    if key not in _CPU_CHOICE:
        if torch.compiler.is_compiling():  # no timing while dynamo traces: oneDNN, as before measuring
            return True
        _CPU_CHOICE[key] = onednn_measured_faster(x_NA, w_EAB)
    return _CPU_CHOICE[key]


def row_class(mean_rows: float) -> int:
    """Rows per expert as the choice's key: the nearest power of two (the kernels' order changes
    between a few rows and a few hundred, not within a factor of 1.4)."""
    return 1 << max(0, round(math.log2(max(mean_rows, 1.0))))


def onednn_measured_faster(x_NA: torch.Tensor, w_EAB: torch.Tensor) -> bool:
    """Whether the `onednn` strategy beats the one torch's matmul gives (`grouped`, else `loop`) on these
    very operands, the rows split evenly over the experts, each strategy as the layer runs it (oneDNN's
    windows, packed weights and cat included; all E experts' weights, so the caches hold what they will
    hold). Interleaved, one warm-up and the median of three each. oneDNN must be 5% faster: a tie goes
    to torch's own kernel, which every other path uses, and a noisy machine rarely flips a choice. On an
    Intel Xeon oneDNN took 0.66-0.75x the time at decode sizes on wide weights and 1.1-1.7x on narrow
    ones from 32 rows on; on an AMD EPYC it tied at 384-1024 rows (docs/PERFORMANCE.md)."""
    try:
        E, N = w_EAB.shape[0], x_NA.shape[0]
        counts = [N // E + (e < N % E) for e in range(E)]
        offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        matmul = matmul_strategy(x_NA, w_EAB)
        calls = {"onednn": lambda: run_strategy("onednn", x_NA, w_EAB, offs, counts),
                 "matmul": lambda: run_strategy(matmul, x_NA, w_EAB, offs, counts)}
        with torch.no_grad():
            took = interleaved_medians(calls, rounds=3)
        faster = took["onednn"] < 0.95 * took["matmul"]
    except (AttributeError, RuntimeError, NotImplementedError):
        faster = False
    if not faster and hasattr(w_EAB, "_onednn_packed"):  # the probe's packed copy: not kept unused
        del w_EAB._onednn_packed
    return faster


def interleaved_medians(calls: dict, rounds: int) -> dict[str, float]:
    """Seconds per call of each variant: one warm-up round, then `rounds` rounds that run every variant
    once in turn, so a load that comes and goes on a shared machine slows all of them alike; the median."""
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds + 1):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            if r:
                runs[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in runs.items()}


def row_bucket(m: int) -> int:
    """m rounded up to one of 8 values per power of two, exact up to 16 (at most 12.5% more rows).

    oneDNN builds a kernel for every new row count (~1 ms, then cached); buckets keep the counts it
    sees to a few dozen per weight shape however the routing varies."""
    if m <= 16:
        return m
    step = 1 << (m.bit_length() - 4)
    return -(-m // step) * step


@lru_cache(maxsize=None)
def _packing_pays(A: int, B: int) -> bool:
    """Measured once per weight shape at first use: whether oneDNN's prepacked [B, A] weight beats its
    strided view for a decode-sized window. It took 0.5-0.7x the time on one AMD EPYC (docs/PERFORMANCE.md)
    and a previous session saw it lose on another x86, hence a measurement, not a rule."""
    try:
        linear = torch.ops.mkldnn._linear_pointwise
        # Fixed numbers, not randn: the probe must not move the global random stream.
        x = torch.arange(16.0 * A).view(16, A).remainder(7) / 7
        w = torch.arange(float(A * B)).view(A, B).remainder(5) / 5
        packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), 16)
        if not torch.allclose(linear(x, packed, None, "none", [], ""), x @ w, rtol=1e-4, atol=1e-3):
            return False
        view = w.t()
        times = interleaved_medians({"packed": lambda: linear(x, packed, None, "none", [], ""),
                                     "view": lambda: linear(x, view, None, "none", [], "")}, rounds=7)
        return times["packed"] < 0.9 * times["view"]
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _onednn_weights(w_EAB: torch.Tensor) -> list:
    """Per-expert weights for oneDNN: prepacked where that measured faster, cached until the parameter
    changes in place (its version counter) or is replaced (a new tensor, a new cache key)."""
    w_B = w_EAB.unbind(0)
    if not _packing_pays(w_EAB.shape[1], w_EAB.shape[2]):
        return [w.t() for w in w_B]  # a strided view: oneDNN reads the [B, A] weight in place
    # Kept on the tensor itself: it dies with it, and a .to() or load makes a new tensor without it.
    hit = getattr(w_EAB, "_onednn_packed", None)
    if hit is None or hit[0] != w_EAB._version:
        hit = (w_EAB._version, [torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), 16)
                                for w in w_B])
        w_EAB._onednn_packed = hit
    return hit[1]


def _onednn_loop(x_NA: torch.Tensor, w_EAB: torch.Tensor, counts_list: list[int]) -> torch.Tensor:
    """Expert e multiplies the bucket-sized window of rows that starts at its own first row; the rows
    past its count belong to the next experts (or to zero padding at the end) and their outputs are
    dropped, which is exact because a GEMM's output rows are independent."""
    linear = torch.ops.mkldnn._linear_pointwise
    w_B = _onednn_weights(w_EAB)
    N, pieces, start = x_NA.shape[0], [], 0
    for e, count in enumerate(counts_list):
        if count:
            m = row_bucket(count)
            xs = x_NA[start:start + m]
            if start + m > N:
                xs = torch.cat([xs, xs.new_zeros(start + m - N, xs.shape[1])])
            pieces.append(linear(xs, w_B[e], None, "none", [], "")[:count])
        start += count
    return torch.cat(pieces) if pieces else x_NA.new_zeros(0, w_EAB.shape[2])


def run_strategy(strategy: str, x_NA, w_EAB, offs_E, counts_list: list[int] | None):
    """One strategy's product: `grouped` takes the int32 group ends, `onednn` and `loop` the counts."""
    if strategy == "grouped":
        return _grouped(x_NA, w_EAB, offs_E, None)
    if strategy == "onednn":
        return _onednn_loop(x_NA, w_EAB, counts_list)
    return _grouped(x_NA, w_EAB, None, counts_list)


def _autocast_operands(x_NA: torch.Tensor, w_EAB: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands in the autocast dtype where autocast is on, as autocast casts a matmul's. Autocast has
    no rule for torch._grouped_mm (torch 2.11-2.13), so fp32 weights under bf16 autocast would otherwise
    run the experts in fp32: on CUDA through its per-expert fallback instead of the bf16 grouped kernel."""
    device = x_NA.device.type
    if not torch.is_autocast_enabled(device) or not x_NA.is_floating_point():
        return x_NA, w_EAB
    dtype = torch.get_autocast_dtype(device)
    return x_NA.to(dtype), w_EAB.to(dtype)


def _expert_mm(x_NA, w_EAB, offs_E, counts: list[list[int]]):
    """The chosen strategy, with per-expert counts fetched once a layer (never for the kernel)."""
    x_NA, w_EAB = _autocast_operands(x_NA, w_EAB)
    strategy = choose_strategy(x_NA, w_EAB)
    if strategy != "grouped" and not counts:
        ends = offs_E.tolist()
        counts.append([b - a for a, b in zip([0] + ends[:-1], ends)])
    return run_strategy(strategy, x_NA, w_EAB, offs_E, counts[0] if counts else None)


class GroupedExperts(nn.Module):
    """E gated FFNs with stacked weights: w_in [E, D, P*F] and w_out [E, F, D]."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, kind: str, init_std: float,
                 out_std: float):
        super().__init__()
        self.num_experts, self.hidden, self.kind = num_experts, hidden, kind
        P = FFN_IN_PROJECTIONS[kind]
        self.w_in_EDX = nn.Parameter(torch.randn(num_experts, d_model, P * hidden) * init_std)
        self.w_out_EFD = nn.Parameter(torch.randn(num_experts, hidden, d_model) * out_std)
        # "gather": dispatch.py, no atomics (deterministic, fp32 sum); "index_add": the scatter-add combine,
        # kept on CPU where it measured faster (docs/PERFORMANCE.md); "auto" picks by device.
        self.combine = "auto"

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                keep_TK: torch.Tensor | None = None, perm=None) -> torch.Tensor:
        """Sum over kept choices of weight * expert(x). Dropped choices contribute nothing.
        `perm`: dispatch.permutation of these choices when the caller already sorted them."""
        combine = self.combine if self.combine != "auto" else (
            "index_add" if x_TD.device.type == "cpu" else "gather")
        if combine == "gather":
            return self._forward_gather(x_TD, expert_ids_TK, weights_TK, keep_TK, perm)
        T, D = x_TD.shape
        if perm is None:
            tok_N, w_N, offs_E = sort_choices(expert_ids_TK, weights_TK, keep_TK, self.num_experts)
        else:  # the same stable sort by expert, so the same rows as sort_choices
            order_N, _, offs_E = perm
            tok_N, w_N = order_N // expert_ids_TK.shape[1], weights_TK.reshape(-1).index_select(0, order_N)
        counts: list[list[int]] = []  # filled on the loop's first use: one host sync, never for the kernel
        # index_select, not x[tok]: ~3x faster forward, and its backward is an index_add rather than
        # an accumulating index_put.
        h_NX = _expert_mm(x_TD.index_select(0, tok_N), self.w_in_EDX, offs_E, counts)
        act_NF = gated_activation(h_NX, self.kind)
        w_N1 = w_N.unsqueeze(1).to(act_NF.dtype)
        # The combine weight scales whichever of act [N, F] and y [N, D] is narrower (same product).
        scale_act = self.hidden < D
        if scale_act:
            act_NF = act_NF * w_N1
        y_ND = _expert_mm(act_NF, self.w_out_EFD, offs_E, counts)
        if not scale_act:
            y_ND = y_ND * w_N1
        return x_TD.new_zeros(T, D).index_add_(0, tok_N, y_ND.to(x_TD.dtype))

    def _forward_gather(self, x_TD, expert_ids_TK, weights_TK, keep_TK, perm):
        order_N, inv_TK, offs_E = perm if perm is not None else permutation(expert_ids_TK, keep_TK, self.num_experts)
        tok_N = order_N // expert_ids_TK.shape[1]
        counts: list[list[int]] = []
        h_NX = _expert_mm(Dispatch.apply(x_TD, tok_N, inv_TK), self.w_in_EDX, offs_E, counts)
        y_ND = _expert_mm(gated_activation(h_NX, self.kind), self.w_out_EFD, offs_E, counts)
        return combine(y_ND, order_N, inv_TK, weights_TK).to(x_TD.dtype)

    def expert_output(self, x_TD: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's unweighted output on every token (A Closer Look's all-experts pass)."""
        return gated_activation(x_TD @ self.w_in_EDX[e], self.kind) @ self.w_out_EFD[e]

    def matrices(self) -> dict[str, torch.Tensor]:
        """Per-expert W_gate, W_up [E, F, D] and W_down [E, D, F] (neuron i = row i / column i)."""
        P = FFN_IN_PROJECTIONS[self.kind]
        slices = self.w_in_EDX.detach().split(self.hidden, dim=2)
        out = {"w_gate_EFD": slices[P - 2].transpose(1, 2), "w_up_EFD": slices[P - 1].transpose(1, 2),
               "w_down_EDF": self.w_out_EFD.detach().transpose(1, 2)}
        if P == 3:
            out["w_gate2_EFD"] = slices[0].transpose(1, 2)
        return out


def naive_experts_forward(experts: GroupedExperts, x_TD, expert_ids_TK, weights_TK, keep_TK=None):
    """The oracle: for each expert, a masked pass over the tokens that chose it."""
    out = torch.zeros_like(x_TD)
    keep_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool) if keep_TK is None else keep_TK
    for e in range(experts.num_experts):
        for k in range(expert_ids_TK.shape[1]):
            mask_T = (expert_ids_TK[:, k] == e) & keep_TK[:, k]
            if mask_T.any():
                y = experts.expert_output(x_TD[mask_T], e)
                out = out.index_add(0, mask_T.nonzero().squeeze(1), y * weights_TK[mask_T, k, None])
    return out


def output_std(init_std: float, n_layers: int) -> float:
    """Residual-branch outputs start smaller so the stream's variance does not grow with depth."""
    return init_std / math.sqrt(2 * n_layers)
