"""Launch functions in N local processes with torchrun's environment, and the per-rank test bodies.

Imported by name in the spawned children (the tests put this folder on sys.path), so the bodies live here
rather than in the test modules, which pytest imports under generated names.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N processes share two cores
    try:
        result = {"ok": True, **(fn(rank, *args) or {})}
    except BaseException as e:  # report every failure, including the ones the test provokes
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_ranks(fn, world: int, out_dir: Path, *args, deadline_s: float = 55.0) -> list[dict]:
    """Run fn(rank, *args) in `world` processes; every process is killed at the wall-clock deadline,
    so a hang fails the test rather than blocking it. Returns each rank's result (or why it has none)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, str(out_dir), args)) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    results = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            results.append({"ok": False, "error": f"rank {r} still running at the {deadline_s}s deadline"})
            continue
        f = Path(out_dir, f"rank{r}.json")
        results.append(json.loads(f.read_text()) if f.is_file()
                       else {"ok": False, "error": f"rank {r} exited with code {p.exitcode} and no result"})
    return results


# ---- per-rank bodies ---------------------------------------------------------------------------

def tiny_config(capacity: float | None, formula: str = "topk", group_size: int = 4096,
                balance_coef: float = 0.0, balance_scope: str = "layer"):
    from moelab.model.config import ModelConfig, MoEConfig

    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=16,
                       moe=MoEConfig(num_experts=4, top_k=2, moe_every=1, expert_hidden=24,
                                     num_shared_experts=1, capacity_factor_train=capacity,
                                     capacity_formula=formula, group_size=group_size,
                                     balance_coef=balance_coef, balance_loss_scope=balance_scope))


def _loss_and_grads(model, ids_list) -> tuple[float, dict]:
    """Mean over the given batches of (loss + aux loss), backpropagated; grads by parameter name."""
    total = sum(((o := model(ids, labels=ids)).loss + o.aux_loss) for ids in ids_list) / len(ids_list)
    total.backward()
    return float(total.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                   if p.grad is not None}


def equivalence(rank: int, dp: int, ep: int, cases: dict, dp_mode: str = "ddp") -> dict:
    """Per case: max |difference| of the loss and of each gradient between this mesh and one process."""
    from moelab.distributed.mesh import init_parallel

    par = init_parallel(dp, ep, timeout_s=30)
    return {name: _equivalence(rank, par, case, dp_mode) for name, case in cases.items()}


def _equivalence(rank: int, par, case: dict, dp_mode: str) -> dict:
    """Max |difference| of the loss and of each gradient between this mesh and one process.

    case["per_shard"]: the reference runs one forward per rank's shard and averages (capacity and the
    balance loss are then per-rank quantities on both sides); otherwise one forward on the whole batch.
    """
    import torch.distributed as dist

    from moelab.distributed.parallelize import is_expert_shard, parallelize, sync_gradients, unwrap
    from moelab.model.transformer import build_model

    cfg = tiny_config(**case["model"])
    world, ep, B = par.world, par.ep, 2 * par.world
    ids = torch.randint(0, cfg.vocab_size, (B, cfg.max_seq_len), generator=torch.Generator().manual_seed(1))
    shards = [ids[r::world] for r in range(world)]
    ref = build_model(cfg, seed=0).train()
    ref_loss, ref_grads = _loss_and_grads(ref, shards if case["per_shard"] else [ids])

    model, manual = parallelize(build_model(cfg, seed=0).train(), par, dp_mode)
    out = model(shards[rank], labels=shards[rank], return_routing=True)
    loss = out.loss + out.aux_loss
    if case.get("world_balance"):  # parallel.balance_reduce="world": f over every rank's tokens
        from moelab.distributed.balance import world_balance_loss

        m = cfg.moe
        loss = out.loss + m.balance_coef * world_balance_loss(out.routing, m.balance_loss_scope) \
            + m.z_coef * out.z_loss
    loss.backward()
    if manual:
        sync_gradients(unwrap(model), par)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    diffs = {"loss": abs(float(mean_loss) / world - ref_loss)}
    for name, p in unwrap(model).named_parameters():
        want = ref_grads[name]
        if is_expert_shard(p):
            L = want.shape[0] // ep
            want = want[par.ep_rank * L:(par.ep_rank + 1) * L]
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2: a DTensor
        diffs[name] = float((grad - want).abs().max())
    return diffs


def dies(rank: int, timeout_s: float, how: str) -> dict:
    """Rank 1 raises (or stalls past the timeout) before a collective; rank 0 must fail, not hang."""
    from moelab.distributed.mesh import barrier, init_parallel

    init_parallel(2, 1, timeout_s=timeout_s)
    if rank == 1:
        if how == "stall":
            time.sleep(timeout_s * 2)
            return {}
        raise RuntimeError("rank 1 failed on purpose")
    t0 = time.monotonic()
    try:
        barrier()
    except Exception as e:
        return {"caught": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - t0}
    return {"caught": None}


def reduce_check(rank: int) -> dict:
    """Each rank reports rank-dependent metrics; every rank gets the declared reductions back."""
    from moelab.distributed.mesh import init_parallel
    from moelab.distributed.metrics import reduce_metrics

    par = init_parallel(2, 1, timeout_s=30)
    local = {"loss": float(rank), "grad_norm": 1.0 + rank, "tokens_per_second": 10.0, "lr": 0.1,
             "moe0/dropped_share": 0.25 * rank, "moe0/load_max_over_mean": 2.0 - rank}
    return {"reduced": reduce_metrics(local, par)}


def dcp_roundtrip(rank: int, dp: int, ep: int, path: str, mode: str) -> dict:
    """Train one step, save DCP (mode "save"), or load it into a fresh model (mode "load"); report the
    single-process view of the state so the test can compare across world sizes."""
    from moelab.distributed.dcp import load_dcp, save_dcp
    from moelab.distributed.mesh import init_parallel
    from moelab.distributed.parallelize import parallelize, sync_gradients, unwrap
    from moelab.distributed.state import full_state
    from moelab.model.transformer import build_model

    cfg = tiny_config(None)
    par = init_parallel(dp, ep, timeout_s=30)
    model, manual = parallelize(build_model(cfg, seed=0 if mode == "save" else 1).train(), par)
    core = unwrap(model)
    opt = torch.optim.AdamW(core.parameters(), lr=1e-2)
    if mode == "save":
        ids = torch.randint(0, cfg.vocab_size, (2 * par.world, 16), generator=torch.Generator().manual_seed(1))
        out = model(ids[rank::par.world], labels=ids[rank::par.world])
        (out.loss + out.aux_loss).backward()
        if manual:
            sync_gradients(core, par)
        opt.step()
        save_dcp(Path(path), core, opt, par)
    else:
        load_dcp(Path(path), core, opt, par)
    weights, osd = full_state(core, opt, par)
    exp_avg = {i: s["exp_avg"].sum().item() for i, s in osd["state"].items()}
    return {"weights": {k: v.double().sum().item() for k, v in weights.items()}, "exp_avg": exp_avg}
