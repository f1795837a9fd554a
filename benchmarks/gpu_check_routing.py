"""gpu_check's routing-compile rows: the routing path (model/route_plan.py) compiled against eager.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

Three things, on the same weights and inputs, interleaved (A, B, A, B), medians:
- the routing call alone (scoring, top-k, capacity drops at factor 1.25, the sort by expert, the router
  losses), forward: compiled / eager;
- whether they agree: tokens whose K ids are the same, choices with the same drop verdict, the largest
  combine-weight difference (inductor fuses the softmax, so it may round differently in the last bit;
  the aot_eager backend runs eager's own operators and agrees exactly);
- the E64 MoE layer (+ shared experts, bf16, dropless as in layer-bf16), fwd and fwd+bwd, with
  `model.compile_routing=on` / `off`.
The decision: compile where the layer's fwd+bwd took at most 0.97 of eager's (beyond timing noise) and the
routing agreed. `gpu_check.py --record` files it in src/moelab/model/routing_compile.json, which
`model.compile_routing=auto` reads.

    python benchmarks/gpu_check_routing.py --device cpu --backend inductor   # the CPU rows of PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

import moelab.model.route_plan as rp  # noqa: E402
from moelab.model.capacity import drop_rule  # noqa: E402
from moelab.model.config import ModelConfig, MoEConfig  # noqa: E402
from moelab.model.experts import GatedFFN  # noqa: E402
from moelab.model.moe import MoELayer  # noqa: E402
from moelab.model.routers import build_router  # noqa: E402

CASES = {"gpu": dict(E=64, K=6, F=512, shared=2, D=2048, T=16384),
         "cpu": dict(E=64, K=6, F=256, shared=2, D=512, T=4096),
         "tiny": dict(E=8, K=2, F=64, shared=1, D=64, T=128)}
FASTER = 0.97  # compiled / eager for the layer's fwd+bwd at most this to compile


def _layers(dev, c: dict, dtype, backend: str):
    cfg = ModelConfig(d_model=c["D"], n_heads=8, ffn_hidden=c["F"], compile_routing="off",
                      moe=MoEConfig(num_experts=c["E"], top_k=c["K"]))
    torch.manual_seed(0)
    eager = MoELayer(cfg, 0, c["E"], build_router(cfg, c["E"], None)).to(dev, dtype)
    on = copy.deepcopy(eager)
    on.compile_routing, on.compile_backend = "on", backend
    return eager, on


def routing_call(dev, c: dict, dtype, backend: str) -> tuple[dict, dict]:
    """({eager, compiled}: forward of the routing path), agreement of the two on one input."""
    eager, _ = _layers(dev, c, dtype, backend)
    x = torch.randn(c["T"], c["D"], device=dev, dtype=dtype)
    rule = drop_rule(c["T"], c["E"], c["K"], 1.25)
    comp = rp.compiled_plan(backend)

    def run(fn):
        def go():
            with torch.no_grad():
                return fn(eager.router, x, None, None, rule, c["E"])
        return go

    fns = {"eager": run(rp.plan_routing), "compiled": run(comp)}
    a, b = fns["eager"](), fns["compiled"]()  # the compiled call's first run compiles
    agree = {"ids": float((a.routing.expert_ids_TK == b.routing.expert_ids_TK).all(-1).float().mean()),
             "drops": float((a.dropped_TK == b.dropped_TK).float().mean()),
             "weights": float((a.weights_TK - b.weights_TK).abs().max())}
    return fns, agree


def layer_pair(dev, c: dict, dtype, backend: str, backward: bool) -> dict:
    """The MoE layer (+ shared experts) with eager and with compiled routing, same weights and input."""
    eager, on = _layers(dev, c, dtype, backend)
    shared = GatedFFN(c["D"], c["shared"] * c["F"], "swiglu", 0.02, 0.02).to(dev, dtype) if c["shared"] else None
    x = torch.randn(c["T"], c["D"], device=dev, dtype=dtype, requires_grad=backward)
    g = torch.randn_like(x)

    def run(layer):
        def go():
            if not backward:
                with torch.no_grad():
                    return layer(x).y_TD
            for m in (layer, shared):
                if m is not None:
                    m.zero_grad(set_to_none=True)
            x.grad = None
            y = layer(x).y_TD
            (y + shared(x) if shared is not None else y).backward(g)
        return go

    return {"eager routing": run(eager), "compiled routing": run(on)}


def spread(t, a: str, b: str) -> str:
    """The range of the per-round ratios a / b: the interval beside the median."""
    r = [x / y for x, y in zip(t[a], t[b])]
    return f"rounds {min(r):.3f}-{max(r):.3f}"


def agreement_ok(agree: dict) -> bool:
    return agree["ids"] >= 0.999 and agree["drops"] >= 0.999 and agree["weights"] <= 1e-5


def rows_and_record(dev, c: dict, dtype, backend: str, reps: int, warmup: int) -> tuple[list[dict], dict]:
    """The rows (check, what, value, limit, ok, note) and the record `--record` files for this device."""
    shape = f"E {c['E']} top-{c['K']}, D {c['D']}, {c['T']} tokens"
    fns, agree = routing_call(dev, c, dtype, backend)
    t = bc.interleaved(fns, reps=reps, warmup=warmup, device=dev.type)
    call = t.ratio("compiled", "eager")
    rows = [_row(f"routing path ({shape}, capacity 1.25), fwd: compiled / eager", call, None, True,
                 f"{t.median('compiled') * 1e3:.3f} ms vs {t.median('eager') * 1e3:.3f} ms, "
                 f"{spread(t, 'compiled', 'eager')}, backend {backend}"),
            _row("routing compiled vs eager: same ids (share of tokens), same drops (share of choices)",
                 f"{agree['ids']:.6f}, {agree['drops']:.6f}", ">= 0.999", agreement_ok(agree),
                 f"largest combine-weight difference {agree['weights']:.1e} (limit 1e-5)")]
    layer = {}
    for backward in (False, True):
        kind = "fwd+bwd" if backward else "fwd"
        t = bc.interleaved(layer_pair(dev, {**c}, dtype, backend, backward), reps=reps, warmup=warmup,
                           device=dev.type)
        layer[kind] = t.ratio("compiled routing", "eager routing")
        rows.append(_row(f"MoELayer {shape} + {c['shared']} shared, {kind}: compiled routing / eager routing",
                         layer[kind], None, True, f"{t.median('compiled routing') * 1e3:.2f} ms vs "
                                                  f"{t.median('eager routing') * 1e3:.2f} ms, "
                                                  f"{spread(t, 'compiled routing', 'eager routing')}, "
                                                  f"{str(dtype).replace('torch.', '')}"))
    decide = layer["fwd+bwd"] <= FASTER and agreement_ok(agree)
    rows.append(_row("decision: model.compile_routing=auto compiles here", decide, None, True,
                     f"layer fwd+bwd <= {FASTER} of eager and agreement ok; gpu_check.py --record files it"))
    record = {"torch": rp.torch_minor(), "compile": decide, "layer_fwd_bwd": round(layer["fwd+bwd"], 3),
              "layer_fwd": round(layer["fwd"], 3), "routing_call": round(call, 3), "backend": backend,
              "case": shape, "agreement": agree}
    return rows, record


def record(key: str, entry: dict, path: Path = rp.RECORD) -> None:
    """File `entry` under `key` in the record `auto` reads, keeping the other devices' entries."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("devices", {})[key] = entry
    path.write_text(json.dumps(data, indent=1) + "\n")


def _row(what, value, limit, ok, note):
    return {"check": "routing-compile", "what": what, "value": value, "limit": limit, "ok": bool(ok), "note": note}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--case", choices=list(CASES), default="cpu")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--record", action="store_true", help="file the decision in routing_compile.json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    bc.setup(threads=1 if dev.type == "cpu" else torch.get_num_threads())
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows, rec = rows_and_record(dev, CASES[args.case], dtype, args.backend, args.reps, warmup=2)
    for r in rows:
        print(f"| {r['what']} | {r['value']} | {r['note']} |")
    if args.record:
        record(rp.device_key(dev), rec)
        print(f"recorded in {rp.RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
