"""Tracing a transformers MoE model by hooks vs a plain forward of the same model (eval, no_grad).

Two families, each a small random model built from its config class (no download):
  mixtral  (softmax top-k; router and experts hooked),
  glm4_moe (DeepSeek-V3 style: sigmoid, correction bias, groups, routed scaling; shared expert).
Variants, timed in the same rounds as the plain forward:
  capture: the forward under HFRoutingRecorder, plus `pop()` (the CapturedLayers a trace is written from);
  rows:    capture + `trace.build.batch_rows` (the trace's columns, full probabilities included).
The issue's target is trace throughput >= 0.9x a plain forward, i.e. time ratio <= 1/0.9 = 1.11.

    python benchmarks/bench_hf_trace.py [--device cuda] [--json rows.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

from moelab.trace.adapters import HFRoutingRecorder  # noqa: E402
from moelab.trace.build import batch_rows  # noqa: E402

BATCH, SEQ, TARGET = 4, 256, 1 / 0.9
COMMON = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              head_dim=64, max_position_embeddings=SEQ, num_experts_per_tok=2)


def build(family: str, device: str):
    import transformers

    if family == "mixtral":
        cfg = transformers.MixtralConfig(**COMMON, intermediate_size=1024, num_local_experts=8)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.Glm4MoeConfig(**COMMON, intermediate_size=1024, moe_intermediate_size=512,
                                         n_routed_experts=8, n_group=2, topk_group=1, first_k_dense_replace=0,
                                         n_shared_experts=1, routed_scaling_factor=2.5)
        model = transformers.Glm4MoeForCausalLM(cfg)
    return model.to(device).eval()


def batch_of(vocab: int, device: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (BATCH, SEQ))
    zeros = torch.zeros_like(ids)
    return {"input_ids": ids, "doc": torch.arange(BATCH).unsqueeze(1).expand(BATCH, SEQ).contiguous(),
            "pos": torch.arange(SEQ).expand(BATCH, SEQ).contiguous(), "domain_id": zeros, "lang_id": zeros,
            "turn": zeros, "ids_dev": ids.to(device)}


def time_family(family: str, device: str, reps: int) -> list[bc.Row]:
    model = build(family, device)
    batch = batch_of(model.config.vocab_size, device)
    rec = HFRoutingRecorder(model)
    blocks = [b.block for b in rec.blocks]

    @torch.no_grad()
    def plain():
        model(input_ids=batch["ids_dev"], use_cache=False)

    @torch.no_grad()
    def capture():
        with rec:
            model(input_ids=batch["ids_dev"], use_cache=False)
            return rec.pop()

    def rows():
        return batch_rows(batch, capture(), 0, ["web"], ["en"], blocks, full_probs=True)

    t = bc.interleaved({"plain": plain, "capture": capture, "rows": rows}, reps=reps, device=device)
    tok = BATCH * SEQ
    name = f"{family}, 4 layers, 8 experts top-2, {BATCH}x{SEQ} tokens"
    tps = {k: f"{tok / t.median(k):,.0f} tok/s" for k in t}
    return [t.row("hf-trace", f"{name}: hooks + pop", "capture", "plain", "traced forward", "plain forward",
                  TARGET, note=f"{tps['capture']} vs {tps['plain']}", device=device),
            t.row("hf-trace", f"{name}: hooks + batch_rows", "rows", "plain", "trace rows", "plain forward",
                  TARGET, note=f"{tps['rows']} vs {tps['plain']}", device=device)]


def main() -> None:
    args = bc.parse_args(__doc__.splitlines()[0])
    bc.setup()
    bc.check_env()
    rows = []
    for family in ("mixtral", "glm4_moe"):
        rows += time_family(family, args.device, max(args.reps, 7))
    bc.emit(rows, args.json)


if __name__ == "__main__":
    main()
