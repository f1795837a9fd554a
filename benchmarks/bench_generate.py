"""Generation with the KV cache against without (`model.generate(..., use_cache=True/False)`), tiny-moe.

Greedy decoding, dropless (capacity_factor=None) so both paths must produce the same tokens, which is
checked before timing. Without the cache every new token re-runs the whole prefix.

    python benchmarks/bench_generate.py [--json rows.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

import moelab  # noqa: E402

BATCH, PROMPT, NEW = 4, 32, 96


def main() -> None:
    args = bc.parse_args(__doc__.splitlines()[0])
    bc.setup()
    bc.check_env()
    dev = args.device
    model = moelab.build_model("tiny-moe", seed=0).to(dev)
    prompt = torch.randint(0, model.config.vocab_size, (BATCH, PROMPT), device=dev)

    def gen(use_cache: bool):
        return lambda: model.generate(prompt, NEW, temperature=0.0, use_cache=use_cache, capacity_factor=None)

    if not torch.equal(gen(True)(), gen(False)()):
        raise SystemExit("cached and uncached greedy generation disagree")
    t = bc.interleaved({"cache": gen(True), "no-cache": gen(False)}, reps=args.reps, device=dev)
    tok = BATCH * NEW
    note = f"{tok / t.median('cache'):,.0f} vs {tok / t.median('no-cache'):,.0f} new tok/s"
    row = t.row("generate", f"tiny-moe, {BATCH} prompts x {PROMPT} tokens + {NEW} new, greedy", "cache",
                "no-cache", "use_cache=True", "use_cache=False", note=note, device=dev)
    bc.emit([row], args.json)


if __name__ == "__main__":
    main()
