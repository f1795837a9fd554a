"""Full-layer expert ablation on a transformers model edited by hooks (`intervene --hf`) vs the same on its
moelab conversion (`intervene CKPT`): CPU seconds and the largest difference of the per-token loss changes.

Tiny random Mixtral and OLMoE built from their config classes, saved, loaded back the way `intervene --hf`
loads them (transformers picks its experts kernel) and converted with `moelab convert --from-hf`'s
importer; random token ids. The HF path reruns the whole model per ablation; the moelab path reuses the
blocks below the ablated one (runner.py).

    PYTHONPATH=src python benchmarks/bench_intervene_hf.py [--tokens 8192] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_intervene import batches  # the same random batches as the moelab-side benchmark

from moelab.intervene import hf_runner
from moelab.intervene.study import run_ablation

SHAPE = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, intermediate_size=128)


def tiny(family: str):
    import transformers

    if family == "mixtral":
        cfg = transformers.MixtralConfig(**SHAPE, num_local_experts=8, num_experts_per_tok=2)
        return transformers.MixtralForCausalLM(cfg)
    cfg = transformers.OlmoeConfig(**SHAPE, num_experts=8, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1)
    model = transformers.OlmoeForCausalLM(cfg)
    with torch.no_grad():  # OLMoE's router starts at zero: random rows so that experts differ in use
        for m in model.modules():
            if type(m).__name__.endswith("TopKRouter"):
                m.weight.normal_(0, 0.5)
    return model


def timed(model, data, targets, ops) -> tuple[float, np.ndarray]:
    """CPU seconds of this process: on a shared machine, wall time mostly measures the neighbours."""
    t0 = time.process_time()
    _, _, deltas = run_ablation(model, data, targets, None, ops=ops)
    return time.process_time() - t0, deltas


def compare(family: str, data, blocks: list[int], repeats: int) -> None:
    from moelab.hf.convert import import_hf
    from moelab.intervene import runner
    from moelab.train.checkpoint import load_model
    from moelab.trace.hf import load_hf_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tiny(family).save_pretrained(Path(tmp) / "hf")
        hf = load_hf_model(Path(tmp) / "hf", "cpu", dtype="float32")
        ours = load_model(import_hf(Path(tmp) / "hf", Path(tmp) / "moelab")).eval()
    impl = getattr(hf.config, "_experts_implementation", None)
    for model, ops in ((hf, hf_runner), (ours, runner)):  # warm-up
        run_ablation(model, data[:1], [(blocks[0], (0,))], None, ops=ops)
    for block in blocks:
        targets = [(block, (e,)) for e in range(8)]
        runs = {"hf": [], "moelab": []}
        for _ in range(repeats):
            runs["hf"].append(timed(hf, data, targets, hf_runner))
            runs["moelab"].append(timed(ours, data, targets, runner))
        t_hf, t_ml = (min(t for t, _ in runs[k]) for k in ("hf", "moelab"))
        diff = float(np.nanmax(np.abs(runs["hf"][0][1] - runs["moelab"][0][1])))
        print(f"{family} (experts kernel {impl}) block {block}: all 8 experts ablated | --hf hooks {t_hf:6.1f} CPU s"
              f" | converted {t_ml:6.1f} CPU s | ratio x{t_hf / t_ml:.2f} | max |delta difference| {diff:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per path; the fastest counts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1: no OpenMP spin in CPU time)")
    ap.add_argument("--families", default="mixtral,olmoe")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    data = batches(args.tokens, args.seq_len, args.batch_size, SHAPE["vocab_size"])
    print(f"{sum(b['input_ids'].numel() for b in data):,} tokens, torch threads {torch.get_num_threads()}")
    for family in args.families.split(","):
        compare(family, data, [0, SHAPE["num_hidden_layers"] - 1], args.repeats)


if __name__ == "__main__":
    main()
