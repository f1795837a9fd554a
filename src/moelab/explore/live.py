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
    """Routes a prompt with `capture(ids_1S) -> [CapturedLayer per MoE layer]` (a moelab or transformers model)."""

    def __init__(self, capture, tokenizer, *, vocab_size: int, num_experts: list[int], top_k: int, max_len: int):
        self.capture, self.tokenizer = capture, tokenizer
        self.vocab_size, self.num_experts, self.top_k = vocab_size, num_experts, top_k
        self.max_len = min(MAX_PROMPT_TOKENS, max_len)
        self._lock = threading.Lock()  # one forward at a time

    def info(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "top_k": self.top_k, "layers": len(self.num_experts)}

    @torch.no_grad()
    def route(self, text: str) -> dict[str, Any]:
        ids = self.tokenizer.encode(text)
        truncated, ids = len(ids) > self.max_len, ids[:self.max_len]
        if not ids:
            raise MoelabError("the prompt encodes to no tokens")
        with self._lock:
            captured = self.capture(torch.tensor([ids]))
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


def load_live(path: str | Path, tokenizer_path: str | None) -> tuple[LiveModel, Any]:
    """A moelab checkpoint or run folder, or a transformers MoE model folder (it has config.json and no
    moelab model.safetensors+config pair), with its tokenizer: --tokenizer, else the model's own."""
    from moelab.data.tokenizer import check_vocab_fits, load_tokenizer

    folder = Path(path)
    is_hf = (folder / "config.json").is_file() and "model_type" in _json(folder / "config.json")
    live = _load_hf(folder) if is_hf else _load_moelab(folder)
    if tokenizer_path is None:
        tokenizer_path = str(folder) if is_hf else _moelab_tokenizer(folder)
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocab_fits(tokenizer, live.vocab_size)
    live.tokenizer = tokenizer
    return live, tokenizer


def _json(path: Path) -> dict:
    import json

    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MoelabError(f"{path} is not valid JSON: {e}") from None
    return value if isinstance(value, dict) else {}


def _load_moelab(folder: Path) -> LiveModel:
    from moelab.trace.capture import RoutingRecorder
    from moelab.train.checkpoint import load_model
    from moelab.train.commands import resolve_checkpoint

    model = load_model(resolve_checkpoint(folder))
    if not model.moe_layers():
        raise MoelabError(f"{folder} is a dense model: it has no routing to explore")
    cfg = model.config

    def capture(ids_1S):  # hooks only for this forward; the evaluation capacity factor, as `moelab eval`
        with RoutingRecorder(model) as rec:
            model(ids_1S, capacity_factor=cfg.moe.capacity_factor_eval)
            return rec.pop()

    return LiveModel(capture, None, vocab_size=cfg.vocab_size, num_experts=cfg.experts_per_layer(),
                     top_k=cfg.moe.top_k, max_len=cfg.max_seq_len)


def _moelab_tokenizer(folder: Path) -> str:
    from moelab.train.checkpoint import read_checkpoint_config
    from moelab.train.commands import resolve_checkpoint

    data_path = read_checkpoint_config(resolve_checkpoint(folder)).get("data", {}).get("path", "")
    tok_file = Path(data_path) / "tokenizer.json"
    if not tok_file.is_file():
        raise MoelabError(f"the checkpoint's corpus tokenizer {tok_file} is missing: give --tokenizer")
    return str(tok_file)


def _load_hf(folder: Path) -> LiveModel:
    from moelab.hf.families import read_hf_config
    from moelab.trace.adapters import HFRoutingRecorder
    from moelab.trace.hf import config_vocab, load_hf_model, preflight, probe

    raw = read_hf_config(folder)
    preflight(folder, raw.get("model_type"))
    model = load_hf_model(folder, "cpu")
    recorder = HFRoutingRecorder(model, raw.get("model_type"))  # refuses a family it cannot read
    with recorder:
        widths, top_k, _ = probe(model, recorder)

    def capture(ids_1S):  # what the model's own router and experts used, read by hooks for this forward
        with recorder:
            model(input_ids=ids_1S, use_cache=False)
            return recorder.pop()

    return LiveModel(capture, None, vocab_size=config_vocab(raw), num_experts=widths, top_k=top_k,
                     max_len=int(raw.get("max_position_embeddings") or MAX_PROMPT_TOKENS))
