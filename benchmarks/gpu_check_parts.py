"""The pieces of gpu_check.py: problems, reference passes, FLOP count, the HF trace and the process group.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.
"""

from __future__ import annotations

import copy
import datetime
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import moelab.model.experts as experts_mod
from moelab.model.config import ModelConfig, MoEConfig
from moelab.model.experts import GatedFFN, GroupedExperts, naive_experts_forward
from moelab.model.moe import MoELayer
from moelab.model.routers import build_router

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, matched in this order.
PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
         ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0)]


def row(check: str, what: str, value, limit, ok: bool, note: str = "") -> dict:
    return {"check": check, "what": what, "value": value, "limit": limit, "ok": bool(ok), "note": note}


def table(rows: list[dict], info: dict) -> str:
    head = ", ".join(f"{k} {v}" for k, v in info.items())
    lines = [f"gpu_check: {head}", "", "| check | what | value | limit | ok | note |", "|---|---|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['what']} | {_fmt(r['value'])} | {_fmt(r['limit'])} | "
                     f"{'ok' if r['ok'] else '**FAIL**'} | {r['note']} |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


# ---- experts in bf16 ------------------------------------------------------------------------------

def expert_problem(dev, *, E, K, D, F, T):
    """fp32 experts whose weights are exactly bf16 values, inputs likewise, and a top-K routing."""
    g = torch.Generator().manual_seed(0)
    ex = GroupedExperts(E, D, F, "swiglu", init_std=D ** -0.5, out_std=F ** -0.5)
    with torch.no_grad():
        for p in ex.parameters():  # rounded once, so fp32 and bf16 passes start from the same numbers
            p.copy_(p.bfloat16().float())
    x_TD = torch.randn(T, D, generator=g).bfloat16().float()
    w_TK, ids_TK = torch.randn(T, E, generator=g).softmax(-1).topk(K, dim=-1)
    return ex.to(dev), x_TD.to(dev), ids_TK.to(dev), w_TK.to(dev)


def copy_experts(ex: GroupedExperts, dtype: torch.dtype) -> GroupedExperts:
    return copy.deepcopy(ex).to(dtype)


def experts_pass(ex, x_TD, ids_TK, w_TK, g_TD, naive: bool) -> dict[str, torch.Tensor]:
    """Output and the gradients of <y, g> wrt x, the combine weights and both weight stacks, in fp32."""
    x = x_TD.clone().requires_grad_()
    w = w_TK.to(x_TD.dtype).clone().requires_grad_()  # the naive loop adds in x's dtype
    y = naive_experts_forward(ex, x, ids_TK, w) if naive else ex(x, ids_TK, w)
    grads = torch.autograd.grad((y * g_TD).sum(), [x, w, ex.w_in_EDX, ex.w_out_EFD])
    names = ["output", "grad x", "grad combine weights", "grad w_in", "grad w_out"]
    return {n: t.detach().float() for n, t in zip(names, [y, *grads])}


def strategy_of(ex: GroupedExperts, x_TD: torch.Tensor) -> str:
    """The strategy a training step takes for these bf16 operands."""
    return experts_mod.choose_strategy(x_TD.bfloat16().requires_grad_(), ex.w_in_EDX)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ---- MoE layer vs its dense floor -------------------------------------------------------------------

def layer_variants(dev, c: dict, backward: bool) -> dict:
    cfg = ModelConfig(d_model=c["D"], n_heads=8, ffn_hidden=c["F"],
                      moe=MoEConfig(num_experts=c["E"], top_k=c["K"]))
    bf = torch.bfloat16
    moe = MoELayer(cfg, 0, c["E"], build_router(cfg, c["E"], None)).to(dev, bf)
    shared = GatedFFN(c["D"], c["shared"] * c["F"], "swiglu", 0.02, 0.02).to(dev, bf) if c["shared"] else None
    dense = GatedFFN(c["D"], (c["K"] + c["shared"]) * c["F"], "swiglu", 0.02, 0.02).to(dev, bf)
    x = torch.randn(c["T"], c["D"], device=dev, dtype=bf, requires_grad=backward)
    g = torch.randn_like(x)

    def moe_fn():
        y = moe(x).y_TD
        return y + shared(x) if shared is not None else y

    def run(fn, module_list):
        def go():
            if not backward:
                with torch.no_grad():
                    return fn()
            for m in module_list:
                m.zero_grad(set_to_none=True)
            x.grad = None
            fn().backward(g)
        return go

    return {"moe": run(moe_fn, [moe] + ([shared] if shared else [])), "dense": run(lambda: dense(x), [dense])}


# ---- a training step ------------------------------------------------------------------------------

def flops_per_token(cfg: ModelConfig, seq: int) -> tuple[float, str]:
    """Model FLOPs of one token's forward and backward, as PaLM's appendix B counts them."""
    n = cfg.num_active_params() - cfg.vocab_size * cfg.d_model  # the input embedding is a lookup
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq
    total = 6 * n + attn
    return float(total), (f"6 N + 12 L H Q S = 6 x {n:,} + 12 x {cfg.n_layers} x {cfg.n_heads} x "
                          f"{cfg.head_size} x {seq} = {total:,} (N: active parameters without the input "
                          "embedding; dropless expert count; causal attention counted in full)")


def peak_bf16_tflops(dev) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((p for key, p in PEAKS if key in name), None)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def fitting_train_step(preset: str, seq: int, dev, batches: list[int], steps: int, info: dict | None = None,
                       bf16_params: bool = False, chunked_loss: bool = False, compile_backend: str | None = None,
                       activation_checkpointing: bool = False):
    """(config, batch, seconds of `steps` timed steps) for the largest batch in `batches` that fits.

    The options are the training loop's (train.param_dtype=bf16, the chunked loss, train.compile,
    train.activation_checkpointing); AdamW is fused on CUDA as build_optimizer chooses. `info`, if given,
    receives "peak_gib" ({batch: peak GiB allocated, or "OOM"}; CUDA only) and "step" (the fitting step)."""
    from moelab.model.transformer import build_model
    from moelab.train.config import TrainConfig
    from moelab.train.loop import autocast_for
    from moelab.train.optim import build_optimizer
    from moelab.train.precision import MasterWeights
    from moelab.train.step_options import apply_step_options

    model = build_model(preset, seed=0).to(dev).train()
    opt = build_optimizer(model, TrainConfig())
    mw = MasterWeights(model) if bf16_params else None
    apply_step_options(model, compile_backend is not None, activation_checkpointing,
                       backend=compile_backend or "inductor")
    amp = autocast_for(dev, "bf16")
    peaks = {}
    for batch in batches:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)

        def step():
            with amp:
                o = model(ids, labels=ids, return_logits=not chunked_loss)
            (o.loss + o.aux_loss).backward()
            if mw:
                mw.grads_to_master()
            opt.step()
            if mw:
                mw.master_to_model()
            opt.zero_grad(set_to_none=True)

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            step()  # warm-up; the first step also allocates the optimizer state (and compiles)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(dev)
            seconds = time.perf_counter() - t0
            if dev.type == "cuda":
                peaks[batch] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)
            if info is not None:
                info.update(peak_gib=peaks, step=step)
            return model.config, batch, seconds, steps
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e) or batch == batches[-1]:
                raise
            peaks[batch] = "OOM"
        # Out here the exception and the activations its traceback held are gone. With bf16 parameters the
        # optimizer holds the fp32 masters, so the model's own bf16 gradients are cleared apart.
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    raise AssertionError("unreachable")


# ---- per-operator profiles ------------------------------------------------------------------------

def profile_ops(fn, dev, path: Path, title: str, rows: int = 30) -> tuple[str, float]:
    """Profile two calls of `fn` (after one warm-up) and write torch.profiler's operator table to `path`.
    Returns (the operator with most self time, its share of all self time): device time on CUDA, CPU
    time elsewhere."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            fn()
        _sync(dev)
    avgs = prof.key_averages()
    if dev.type == "cuda":
        key = "self_device_time_total" if hasattr(avgs[0], "self_device_time_total") else "self_cuda_time_total"
        sort = "self_cuda_time_total" if key == "self_cuda_time_total" else "self_device_time_total"
    else:
        key, sort = "self_cpu_time_total", "self_cpu_time_total"
    total = sum(getattr(a, key) for a in avgs) or 1.0
    top = max(avgs, key=lambda a: getattr(a, key))
    path.write_text(f"{title}\n{device_line(dev)}\n\n" + avgs.table(sort_by=sort, row_limit=rows) + "\n")
    return top.key, getattr(top, key) / total


def device_line(dev) -> str:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return f"{name}, torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"


# ---- moelab's MoE layer against transformers' sparse MoE blocks ------------------------------------

def experts_implementations() -> list[str]:
    """'eager' and every experts implementation the installed transformers registers."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return ["eager"]
    return ["eager"] + list(getattr(ALL_EXPERTS_FUNCTIONS, "_global_mapping", {}))


def peer_block(family: str, c: dict, impl: str, dev):
    """transformers' own sparse MoE block (router, top-k, experts) at the shape `c`, in bf16."""
    torch.manual_seed(0)
    if family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = MixtralConfig(hidden_size=c["D"], intermediate_size=c["F"], num_local_experts=c["E"],
                            num_experts_per_tok=c["K"])
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        cfg = Qwen3MoeConfig(hidden_size=c["D"], moe_intermediate_size=c["F"], num_experts=c["E"],
                             num_experts_per_tok=c["K"], norm_topk_prob=True)
    cfg._experts_implementation = impl
    with torch.device(dev):  # built on the device: a Mixtral-sized block initialised on a CPU takes seconds
        block = Block(cfg)
    with torch.no_grad():  # transformers leaves expert weights to _init_weights, which a bare block skips
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block.to(torch.bfloat16)


def peer_variants(dev, family: str, c: dict, backward: bool) -> tuple[dict, dict]:
    """({name: step}, {name: why it cannot run}) for moelab's MoELayer and each transformers block."""
    from moelab.model.config import RouterConfig

    bf = torch.bfloat16
    cfg = ModelConfig(d_model=c["D"], n_heads=8, ffn_hidden=c["F"],
                      moe=MoEConfig(num_experts=c["E"], top_k=c["K"],
                                    router=RouterConfig(renormalize=family != "mixtral")))
    with torch.device(dev):
        mods = {"moelab": MoELayer(cfg, 0, c["E"], build_router(cfg, c["E"], None)).to(bf)}
    x = torch.randn(1, c["T"], c["D"], device=dev, dtype=bf, requires_grad=backward)
    g = torch.randn_like(x)

    def call(name):
        out = mods[name](x[0]).y_TD if name == "moelab" else mods[name](x)
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(x.shape)

    def run(name):
        def go():
            if not backward:
                with torch.no_grad():
                    return call(name)
            mods[name].zero_grad(set_to_none=True)
            x.grad = None
            call(name).backward(g)
        return go

    fns, skipped = {"moelab": run("moelab")}, {}
    for impl in experts_implementations():
        name = f"transformers {impl}"
        try:
            mods[name] = peer_block(family, c, impl, dev)
            run(name)()  # a dry run: a kernel this machine lacks, or memory, shows here
            _sync(dev)
            fns[name] = run(name)
        except Exception as e:  # noqa: BLE001  (any failure is reported as the row's value)
            mods.pop(name, None)
            skipped[name] = ("OOM" if _is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return fns, skipped


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---- a transformers model traced on the device ----------------------------------------------------------

def _tiny_mixtral(dev):
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=64, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).to(dev).eval(), cfg.to_dict()


def _batches(n_batches: int, B: int, S: int, vocab: int):
    g = torch.Generator().manual_seed(1)
    for b in range(n_batches):
        z = torch.zeros(B, S, dtype=torch.long)
        yield {"input_ids": torch.randint(0, vocab, (B, S), generator=g), "doc": z + b * B + torch.arange(B)[:, None],
               "pos": z + torch.arange(S), "domain_id": z, "lang_id": z, "turn": z}


@torch.no_grad()
def trace_tiny_hf(dev, tokens: int) -> tuple[int, float, int]:
    """(tokens traced, share of rows whose expert equals the router module's own choice, rows written)."""
    from moelab.trace.adapters import HFRoutingRecorder
    from moelab.trace.build import write_trace
    from moelab.trace.hf import probe
    from moelab.trace.io import open_trace
    from moelab.trace.schema import TraceMeta

    model, raw = _tiny_mixtral(dev)
    hooked = []  # an independent reading: the ids the router module returns, in block order
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    handles = [r.register_forward_hook(lambda mod, a, out: hooked.append(out[2].cpu())) for r in routers]
    S, B = 64, 4
    try:
        with HFRoutingRecorder(model, raw.get("model_type")) as rec:
            widths, top_k, _ = probe(model, rec)
            hooked.clear()  # the probe's forward is not part of the trace
            meta = TraceMeta(num_experts=widths, top_k=top_k, model_config=raw, source="hf:tiny-mixtral",
                             labels={"domain": ["d"], "lang": ["l"]},
                             extra={"moe_blocks": [b.block for b in rec.blocks]})

            def capture(batch):
                model(input_ids=batch["input_ids"].to(dev), use_cache=False)
                return rec.pop()

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "t.parquet"
                stats = write_trace(_batches(-(-tokens // (B * S)), B, S, 512), path, meta, capture, optional=[],
                                    blocks=meta.extra["moe_blocks"], max_tokens=tokens, full_probs=False)
                got = np.concatenate([b["expert"] for b in open_trace(path).iter_batches(columns=["expert"])])
    finally:
        for h in handles:
            h.remove()
    L = len(routers)
    per_batch = [torch.stack(hooked[i:i + L], dim=1) for i in range(0, len(hooked), L)]  # [T, L, K] each
    want_TLK = torch.cat(per_batch)[:tokens]
    # The trace ranks a token's choices by descending weight; compare as sets per (token, layer).
    got_sorted = np.sort(got.reshape(-1, want_TLK.shape[-1]), axis=1)
    want_sorted = np.sort(want_TLK.reshape(-1, want_TLK.shape[-1]).numpy(), axis=1)
    same = float((got_sorted == want_sorted).all(1).mean()) if got_sorted.shape == want_sorted.shape else 0.0
    return stats["tokens"], same, stats["rows"]


# ---- torch.distributed in one process ------------------------------------------------------------------

def one_process_group(dev, tokens: int) -> dict:
    """Start a world-1 group on the device's backend and compare collectives with their single-process
    meaning: all-reduce of a tensor, expert parallelism (its all-to-all) against the plain experts,
    and the declared metric reductions. Each comparison gives an error or the line of its exception,
    so one failing collective does not hide the others."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from moelab.distributed.mesh import Parallel, backend_for

    backend = backend_for(dev)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        try:
            mesh = init_device_mesh(dev.type, (1, 1), mesh_dim_names=("dp", "ep"))
            par = Parallel(dp=1, ep=1, rank=0, mesh=mesh)
            checks = {"all_reduce (sum) of a tensor": lambda: _all_reduce_err(dev),
                      "expert-parallel all_to_all vs plain experts (output and grads)":
                          lambda: _expert_parallel_err(dev, par, tokens),
                      "reduce_metrics, called as at world 2 over this world-1 group": lambda: _metrics_err(mesh)}
            errors = {name: _error_or_message(fn) for name, fn in checks.items()}
        finally:
            dist.destroy_process_group()
    return {"backend": backend, "errors": errors}


def _error_or_message(fn) -> float | str:
    try:
        return fn()
    except Exception as e:  # reported in the table as a failed row
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _all_reduce_err(dev) -> float:
    import torch.distributed as dist

    t = torch.arange(8.0, device=dev)
    r = t.clone()
    dist.all_reduce(r)
    return float((r - t).abs().max())


def _expert_parallel_err(dev, par, tokens: int) -> float:
    from moelab.distributed.parallelize import ExpertParallel

    ex, x, ids, w = expert_problem(dev, E=8, K=2, D=64, F=64, T=tokens)
    plain = experts_pass(ex, x, ids, w, torch.ones_like(x), naive=False)
    sharded = experts_pass(ExpertParallel(ex, 0, 1, par.group("ep")), x, ids, w, torch.ones_like(x), naive=False)
    return max(rel_err(sharded[k], plain[k]) for k in plain)


def _metrics_err(mesh) -> float:
    """reduce_metrics returns early at world 1, so it is handed a Parallel that says dp = 2: its real
    all-reduce then runs over the one-process group, a sum stays and a mean halves."""
    from moelab.distributed.mesh import Parallel
    from moelab.distributed.metrics import reduce_metrics

    m = {"loss": 2.5, "tokens_per_second": 100.0}
    got = reduce_metrics(m, Parallel(dp=2, ep=1, rank=0, mesh=mesh))
    return max(abs(got["loss"] - 1.25), abs(got["tokens_per_second"] - 100.0))
