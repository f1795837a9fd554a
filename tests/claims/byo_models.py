"""Tiny models to bring to the claims rows: random transformers MoE models of a family (tests/trace/hf_tiny.py's
builder) saved with a tokenizer, edited where a test plants an answer, and tiny moelab checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trace"))

from hf_tiny import tiny_config  # noqa: E402

VOCAB = 400  # >= moelab's smallest byte-level tokenizer (specials + 256 bytes)
TEXT = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog.", "x = 3 * (2 + 1) = 9",
        "Datei konnte nicht geöffnet werden", "Impossible d'ouvrir le fichier", "ファイルを開けません"] * 40


def tokenizer():
    from moelab.data.tokenizer import train_tokenizer

    return train_tokenizer(TEXT, VOCAB)


def save_hf(folder: Path, model_type: str, seed: int, tok=None, edit=None, transformers_tokenizer: bool = False) -> Path:
    """A random tiny `model_type` LM saved with `tok` (tokenizer.json alone, or as a transformers tokenizer
    folder); `edit(model)` plants weights before saving."""
    import transformers

    cfg = tiny_config(model_type)
    cfg.vocab_size = VOCAB
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(folder)
    if tok is not None and transformers_tokenizer:
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token="<eos>",
                                                    bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")
        fast.save_pretrained(folder)
    elif tok is not None:
        tok.save(folder / "tokenizer.json")
    return folder


def token_only(model) -> None:
    """Attention outputs zeroed: every block's input, so every router's, is a function of the token id alone."""
    for name, p in model.named_parameters():
        if name.endswith("self_attn.o_proj.weight"):
            p.zero_()


def blind_router(model) -> None:
    """Router weights zeroed: every token gets the same experts (all the load on k of E), whatever it is."""
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.zero_()


def save_moelab(folder: Path, tok, router: str = "hash", num_experts: int = 4, seed: int = 0, step: int = 10) -> Path:
    """A tiny moelab checkpoint whose run config names `tok` as its corpus's tokenizer."""
    from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
    from moelab.model.transformer import build_model
    from moelab.train.checkpoint import save_checkpoint

    moe = MoEConfig(num_experts=num_experts, top_k=2, moe_every=1, expert_hidden=16, router=RouterConfig(kind=router))
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=64, moe=moe)
    model = build_model(cfg, seed=seed).eval()
    tok_file = tok.save(folder.parent / f"{folder.name}-tokenizer.json")
    return save_checkpoint(folder, model, {"model": cfg.to_dict(), "tokenizer": {
        "file": str(tok_file), "fingerprint": tok.fingerprint()}}, step=step)
