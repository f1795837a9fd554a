"""The live view: run a moelab checkpoint on a typed prompt and return its routing in the text view's shape.

The forward runs under a RoutingRecorder (hooks, removed on exit), at the checkpoint's evaluation
capacity factor, so a prompt is routed as an evaluation would route it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from moelab.config import MoelabError

MAX_PROMPT_TOKENS = 1024


class LiveModel:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.num_experts = model.config.experts_per_layer()
        self.top_k = model.config.moe.top_k
        self.capacity_factor = model.config.moe.capacity_factor_eval
        self._lock = threading.Lock()  # one forward at a time: the recorder's buffer is shared

    def info(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "top_k": self.top_k, "layers": len(self.num_experts)}

    @torch.no_grad()
    def route(self, text: str) -> dict[str, Any]:
        from moelab.trace.capture import RoutingRecorder

        ids = self.tokenizer.encode(text)
        limit = min(MAX_PROMPT_TOKENS, self.model.config.max_seq_len)
        truncated, ids = len(ids) > limit, ids[:limit]
        if not ids:
            raise MoelabError("the prompt encodes to no tokens")
        with self._lock, RoutingRecorder(self.model) as rec:
            self.model(torch.tensor([ids]), capacity_factor=self.capacity_factor)
            captured = rec.pop()
        layers = []
        for c in captured:
            r = c.routing
            layers.append((r.expert_ids_TK.tolist(), r.weights_TK.float().tolist(),
                           r.probs_TE.float().gather(1, r.expert_ids_TK).tolist(), r.dropped_TK.tolist()))
        tokens = [{"seq": 0, "pos": t, "doc_pos": t, "token": tok, "turn": -1,
                   "experts": [lay[0][t] for lay in layers], "weights": [lay[1][t] for lay in layers],
                   "probs": [lay[2][t] for lay in layers], "dropped": [lay[3][t] for lay in layers]}
                  for t, tok in enumerate(ids)]
        return {"tokens": tokens, "truncated": truncated, **self.info()}


def load_live(checkpoint: str | Path, tokenizer_path: str | None):
    """A moelab checkpoint (or run folder) and its tokenizer: --tokenizer, else its corpus's tokenizer.json."""
    from moelab.data.tokenizer import check_vocab_fits, load_tokenizer
    from moelab.train.checkpoint import load_model, read_checkpoint_config
    from moelab.train.commands import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    model = load_model(ckpt)
    if not model.moe_layers():
        raise MoelabError(f"{ckpt} is a dense model: it has no routing to explore")
    if tokenizer_path is None:
        data_path = read_checkpoint_config(ckpt).get("data", {}).get("path", "")
        tok_file = Path(data_path) / "tokenizer.json"
        if not tok_file.is_file():
            raise MoelabError(f"the checkpoint's corpus tokenizer {tok_file} is missing: give --tokenizer")
        tokenizer_path = str(tok_file)
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocab_fits(tokenizer, model.config.vocab_size)
    return LiveModel(model, tokenizer), tokenizer
