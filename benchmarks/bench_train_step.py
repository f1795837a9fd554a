"""Whole training steps of the tiny presets against each other (tokens/s as a step-time ratio).

A step is what `train.loop` does per batch: forward with labels and routing, (loss + aux) backward,
gradient clipping, AdamW, zero_grad. Four models step in turn on the same random batch:
tiny-dense, tiny-moe (capacity 1.25 in training, as its preset says), tiny-moe dropless and tiny-rmoe.

    python benchmarks/bench_train_step.py [--batch 8] [--json rows.json]
    python benchmarks/bench_train_step.py --case loss     # the chunked LM loss against the full one

`--case loss`: the LM loss of 2048 tokens, D 512, a 32768-token vocabulary, fp32, forward + backward:
`chunked_lm_loss` (chunks of 512 tokens) against cross-entropy on the full sliced logits, as time and as
the bytes autograd keeps for the backward (counted by a saved-tensors hook, not estimated).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

import moelab  # noqa: E402
from moelab.train.config import TrainConfig  # noqa: E402
from moelab.train.optim import build_optimizer  # noqa: E402

BATCH, SEQ = 8, 256  # 2048 tokens a step; seq = the presets' max_seq_len
RMOE_TARGET = 1.05  # RMoE paper: +1.3% step time over the linear router
DROP_TARGET = 1.1


def stepper(preset: str, ids: torch.Tensor, device: str, capacity_factor="auto"):
    model = moelab.build_model(moelab.load_preset(preset), seed=0).to(device).train()
    opt = build_optimizer(model, TrainConfig())

    def step():
        out = model(ids, labels=ids, return_routing=True, capacity_factor=capacity_factor)
        (out.loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_selection_biases(out.routing)
    return step


def loss_rows(dev: str) -> list:
    import torch.nn.functional as F

    from moelab.model.losses import chunked_lm_loss

    g = torch.Generator().manual_seed(0)
    B, S, D, V = 4, 512, 512, 32768
    h = torch.randn(B, S, D, generator=g).to(dev).requires_grad_()
    w = (torch.randn(V, D, generator=g) * D ** -0.5).to(dev).requires_grad_()
    y = torch.randint(0, V, (B, S), generator=g).to(dev)

    def full():
        logits = (h @ w.t()).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1))

    def chunked():
        return chunked_lm_loss(h, w, y, chunk_tokens=512)

    def saved_bytes(fn):
        n = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.__setitem__(0, n[0] + t.numel() * t.element_size())
                                                      or t, lambda t: t):
            loss = fn()
        loss.backward()
        h.grad = w.grad = None
        return n[0]

    def step(fn):
        def go():
            fn().backward()
            h.grad = w.grad = None
        return go

    kept = {k: saved_bytes(f) for k, f in (("full", full), ("chunked", chunked))}
    t = bc.interleaved({"chunked": step(chunked), "full": step(full)}, reps=5, warmup=1, device=dev)
    note = (f"kept for backward: {kept['chunked'] / 2 ** 20:.0f} MiB vs {kept['full'] / 2 ** 20:.0f} MiB "
            f"(the full (N, V) fp32 logits are {B * S * V * 4 / 2 ** 20:.0f} MiB)")
    return [t.row("lm-loss", f"{B * S} tokens, D {D}, V {V}, fp32, fwd+bwd", "chunked", "full",
                  "chunked_lm_loss", "full logits + cross_entropy", note=note, device=dev,
                  kept_bytes_chunked=kept["chunked"], kept_bytes_full=kept["full"])]


def main() -> None:
    args = bc.parse_args(__doc__.splitlines()[0], cases=["loss", "presets"])
    bc.setup()
    if args.case == "loss":
        bc.emit(loss_rows(args.device), args.json)
        return
    bc.check_env()
    dev = args.device
    ids = torch.randint(0, 4096, (BATCH, SEQ), device=dev)
    steps = {"dense": stepper("tiny-dense", ids, dev), "moe": stepper("tiny-moe", ids, dev),
             "moe-dropless": stepper("tiny-moe", ids, dev, capacity_factor=None),
             "rmoe": stepper("tiny-rmoe", ids, dev)}
    t = bc.interleaved(steps, reps=max(args.reps, 15), device=dev)
    tok = BATCH * SEQ
    tps = {k: f"{tok / t.median(k):,.0f} tok/s" for k in t}
    extra = {"device": dev, "tokens_per_step": tok}
    rows = [
        t.row("train-step", f"tiny-moe vs tiny-dense, {BATCH}x{SEQ} tokens", "moe", "dense", "tiny-moe",
              "tiny-dense", note=f"{tps['moe']} vs {tps['dense']}", **extra),
        t.row("train-step", "tiny-rmoe vs tiny-moe", "rmoe", "moe", "tiny-rmoe", "tiny-moe", RMOE_TARGET,
              note=f"{tps['rmoe']} vs {tps['moe']}", **extra),
        t.row("train-step", "tiny-moe, capacity 1.25 (dropping) vs dropless", "moe", "moe-dropless",
              "dropping on", "dropping off", DROP_TARGET, note=f"{tps['moe']} vs {tps['moe-dropless']}",
              **extra),
    ]
    bc.emit(rows, args.json)


if __name__ == "__main__":
    main()
