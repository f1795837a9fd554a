"""Bring your own model: the claims rows that read one model's routing, on a model moelab did not train.

A brought model is a transformers MoE model (a folder or a hub name, at a `--revision`) or a moelab
checkpoint (or run) folder. Several of them are checkpoints of one training run, in training order, the
last the final one: the single-model rows (specialisation, norm preference) read the last, the saturation
rows compare each earlier one with it. The claims corpus's text is tokenized with the model's own
tokenizer (its folder's tokenizer files; for a moelab checkpoint, the tokenizer of the corpus it trained
on), traced through moelab's `trace --hf` capture (or a moelab trace) and analysed by the same `analyze`
the table's rows read. Each model is named in the results by its content hash (`fingerprint.tree_hash`).

Every check that can refuse runs before a weight is loaded: a missing folder, a folder holding no model,
a dense model, a folder without a tokenizer, checkpoints that do not share a tokenizer or expert count.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

from moelab.claims.fingerprint import code_closure, tree_hash
from moelab.claims.workspace import SOURCES, Workspace
from moelab.config import ConfigError, MoelabError

# Files that hold a transformers tokenizer (one is enough for AutoTokenizer to try).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclasses.dataclass(frozen=True)
class Brought:
    label: str  # as given, with "@revision" when one was named
    folder: Path  # the model's files: a transformers folder or a moelab checkpoint
    kind: str  # "hf" or "moelab"
    fingerprint: str  # tree_hash of the folder: weights, config and tokenizer files
    experts: tuple[int, ...]  # routed experts per MoE layer
    top_k: int

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label.strip("/")).strip("_")[-60:] or "model"


def pairs(paths: Sequence[str], revisions: Sequence[str]) -> list[tuple[str, str | None]]:
    """(path, revision) per checkpoint: one path at several revisions (a hub repo's checkpoint branches),
    several paths at one revision, or one revision per path."""
    if not paths:
        raise MoelabError("--hf needs at least one model folder or hub name")
    if not revisions:
        return [(p, None) for p in paths]
    if len(paths) == 1:
        return [(paths[0], r) for r in revisions]
    if len(revisions) == 1:
        return [(p, revisions[0]) for p in paths]
    if len(revisions) != len(paths):
        raise MoelabError(f"{len(paths)} models and {len(revisions)} revisions: give one revision, one model, "
                          "or as many revisions as models")
    return list(zip(paths, revisions))


def _moelab_folder(path: Path) -> Path | None:
    """The checkpoint a moelab checkpoint or run folder names (None: not moelab's)."""
    from moelab.train.rundir import resolve_checkpoint

    if (path / "checkpoints").is_dir():
        return resolve_checkpoint(path)
    try:
        fmt = json.loads((path / "config.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return path if fmt == "moelab-checkpoint" else None


def resolve(path: str, revision: str | None = None) -> Brought:
    """One model, checked: it exists, holds a model, and that model has MoE layers."""
    from moelab.hf.hub import resolve_hf

    label = f"{path}@{revision}" if revision else str(path)
    local = Path(path).expanduser()
    if local.exists() and not local.is_dir():
        raise MoelabError(f"{path} is a file; give the model's folder (config.json and weights)")
    ckpt = _moelab_folder(local) if local.is_dir() and revision is None else None
    if ckpt is not None:
        return _moelab(label, ckpt)
    if not local.exists() and str(path).startswith((".", "/", "~")):
        raise MoelabError(f"no such folder: {path}")
    folder = resolve_hf(path, revision)
    if not (folder / "config.json").is_file():
        raise MoelabError(f"{folder} holds no model (no config.json)")
    return _hf(label, folder)


def _moelab(label: str, ckpt: Path) -> Brought:
    from moelab.model.config import ModelConfig
    from moelab.train.checkpoint import read_checkpoint_config

    try:
        cfg = ModelConfig.from_dict(read_checkpoint_config(ckpt)["model"], path="model")
    except ConfigError as e:
        raise MoelabError(f"checkpoint {ckpt} has an invalid model config: {e}") from None
    if not cfg.moe_layer_ids():
        raise MoelabError(f"{ckpt} is a dense model: it has no routing to read")
    return Brought(label, ckpt, "moelab", tree_hash(ckpt), tuple(cfg.experts_per_layer()), cfg.moe.top_k)


def _hf(label: str, folder: Path) -> Brought:
    import torch

    from moelab.hf.families import read_hf_config
    from moelab.trace.adapters import HFRoutingRecorder
    from moelab.trace.hf import preflight

    raw = read_hf_config(folder)
    model = preflight(folder, raw.get("model_type"))  # weightless: refuses a dense or unservable model
    experts = []
    for b in HFRoutingRecorder(model, raw.get("model_type")).blocks:  # found, not hooked
        n = getattr(b.experts, "num_experts", None) or getattr(b.router, "num_experts", None)
        if n is None and isinstance(b.experts, torch.nn.ModuleList):
            n = len(b.experts)
        experts.append(int(n) if n is not None else -1)
    k = raw.get("num_experts_per_tok") or raw.get("moe_topk") or raw.get("top_k") or 0
    return Brought(label, folder, "hf", tree_hash(folder), tuple(experts), int(k if isinstance(k, int) else 0))


def tokenizer_of(model: Brought):
    """The model's own tokenizer, checked to fit its vocabulary (a Tokenizer; `.source` is its path)."""
    from moelab.data.tokenizer import load_tokenizer

    if model.kind == "moelab":
        from moelab.train.commands import generation_tokenizer

        try:
            return generation_tokenizer(model.folder, None)
        except MoelabError as e:
            raise MoelabError(f"{model.label}: no usable tokenizer ({e})") from None
    if not any((model.folder / f).is_file() for f in TOKENIZER_FILES):
        raise MoelabError(f"{model.label} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): the claims "
                          "corpus cannot be tokenized for it")
    try:
        tok = load_tokenizer(model.folder)
    except MoelabError as e:
        raise MoelabError(f"{model.label}: no usable tokenizer ({e})") from None
    from moelab.hf.families import read_hf_config
    from moelab.trace.hf import config_vocab

    vocab = config_vocab(read_hf_config(model.folder))
    if tok.vocab_size > vocab:
        raise MoelabError(f"{model.label}: its tokenizer has {tok.vocab_size} tokens, the model's embedding "
                          f"{vocab}: they do not belong together")
    return tok


def check_together(models: Sequence[Brought], toks: Sequence, seeds: bool = False) -> None:
    """Checkpoints of one run (or, `seeds`, runs of one recipe): one tokenizer (the same token ids) and the
    same experts per layer; moelab checkpoints in step order."""
    first = models[0]
    if seeds and len(models) < 2:
        raise MoelabError("--seeds compares independently trained models: give two or more (3 sign a verdict)")
    if len({m.kind for m in models}) > 1:
        raise MoelabError("the models mix transformers folders and moelab checkpoints: not checkpoints of one run")
    for m, t in zip(models[1:], toks[1:]):
        if t.fingerprint() != toks[0].fingerprint():
            raise MoelabError(f"{m.label} and {first.label} tokenize differently: checkpoints of one run share "
                              "a tokenizer (their routing is compared token by token)")
        if m.experts != first.experts:
            raise MoelabError(f"{m.label} has {list(m.experts)} experts per MoE layer, {first.label} "
                              f"{list(first.experts)}: not checkpoints of one model")
    if first.kind == "moelab" and not seeds:
        from moelab.train.checkpoint import checkpoint_step

        steps = [checkpoint_step(m.folder) for m in models]
        if steps != sorted(set(steps)) and len(models) > 1:
            raise MoelabError(f"moelab checkpoints at steps {steps}: give them in training order, each step once")


def corpus_for(ws: Workspace, tok) -> Path:
    """The claims corpus's text tokenized by `tok` (cached per tokenizer content)."""
    return ws.corpus(f"byo-{tok.fingerprint()}", SOURCES, tokenizer=Path(tok.source),
                     tokenizer_content=tok.fingerprint())


def heldout_tokens(corpus: Path) -> int:
    from moelab.data.shards import load_corpus

    return int(load_corpus(corpus).info["splits"]["heldout"]["tokens"])


def seq_len_for(ws: Workspace, model: Brought) -> int:
    """The workspace's sequence length, or the model's longest when that is shorter."""
    if model.kind == "moelab":
        from moelab.train.checkpoint import read_checkpoint_config

        longest = read_checkpoint_config(model.folder)["model"].get("max_seq_len")
    else:
        from moelab.hf.families import read_hf_config

        raw = read_hf_config(model.folder)
        longest = raw.get("max_position_embeddings") or (raw.get("text_config") or {}).get("max_position_embeddings")
    return min(ws.scale.seq_len, int(longest)) if isinstance(longest, int) and longest > 0 else ws.scale.seq_len


def trace_of(ws: Workspace, model: Brought, corpus: Path, *, tokens: int = 0, all_experts: bool = False) -> Path:
    """A held-out trace of the model (its every expert run on every token with `all_experts`)."""
    tokens = tokens or ws.scale.trace_tokens or heldout_tokens(corpus)
    seq_len = seq_len_for(ws, model)
    if model.kind == "moelab":
        if seq_len < ws.scale.seq_len:
            raise MoelabError(f"{model.label}: its max_seq_len {seq_len} is shorter than the claims' sequences "
                              f"({ws.scale.seq_len})")
        return ws.trace(model.folder, f"byo-{model.slug}-{model.fingerprint[:12]}{'-all' if all_experts else ''}",
                        corpus=corpus, all_experts=all_experts, tokens=tokens)
    settings = {"model_content": model.fingerprint, "corpus_content": tree_hash(corpus), "tokens": tokens,
                "seq_len": seq_len, "batch_size": ws.scale.batch_size, "all_experts": all_experts,
                "code": code_closure("moelab.trace.hf", "moelab.claims.byo_norms", "moelab.data.shards",
                                     "moelab.data.objectives")}

    def make(folder: Path) -> None:
        ws.log(f"[claims] tracing {model.label}{' (all experts)' if all_experts else ''}")
        if all_experts:
            from moelab.claims.byo_norms import trace_hf_all_experts

            trace_hf_all_experts(model.folder, corpus, folder / "trace.parquet", tokens=tokens, seq_len=seq_len,
                                 batch_size=ws.scale.batch_size)
        else:
            from moelab.trace.hf import trace_hf

            trace_hf(model.folder, corpus, folder / "trace.parquet", tokens=tokens, seq_len=seq_len,
                     batch_size=ws.scale.batch_size, progress=False, balanced=True)

    name = f"{model.slug}-{model.fingerprint[:12]}{'-all' if all_experts else ''}"
    return ws.cached("byo-traces", name, settings, make) / "trace.parquet"
