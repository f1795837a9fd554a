"""Convert between transformers checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; dots1 and GLM-4 MoE into
moelab only) and moelab checkpoints.

Both directions stream: tensors are read lazily from safetensors (one expert's slice at a time for stacked
experts) and written by a safetensors writer that holds one chunk in memory, so a model larger than RAM
converts. Every name and shape is checked before a byte is written; output appears under its final name
only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from moelab.config import ConfigError, MoelabError
from moelab.hf.export_config import choose_family, hf_config
from moelab.hf.families import moelab_config, read_hf_config
from moelab.hf.hub import resolve_hf
from moelab.hf.io import Entry, TensorReader, one, write_sharded, write_streaming
from moelab.hf.links import IGNORED_SUFFIXES, Link, inert_tensors, model_links
from moelab.model.config import ModelConfig

FORMAT = "moelab-checkpoint"  # moelab.train.checkpoint's folder format
DEFAULT_SHARD_BYTES = 2 << 30


# ---- checks -------------------------------------------------------------------------------------------
def _names(names: list[str], n: int = 3) -> str:
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_tensors(reader: TensorReader, expected: dict[str, tuple[int, ...]], optional: Iterable[str],
                  what: str) -> None:
    """Missing, unexpected and mis-shaped tensors, each named, in that order."""
    keys = set(reader.keys())
    missing = [n for n in expected if n not in keys]
    if missing:
        raise MoelabError(f"{what} lacks {len(missing)} tensor(s) the config needs: {_names(missing)}")
    allowed = set(expected) | set(optional)
    extra = sorted(k for k in keys if k not in allowed and not k.endswith(IGNORED_SUFFIXES))
    if extra:
        raise MoelabError(f"{what} has {len(extra)} tensor(s) the config does not: {_names(extra)}")
    for name, shape in expected.items():
        actual = reader.shape(name)
        if actual != tuple(shape):
            raise MoelabError(f"{what}: tensor {name} has shape {list(actual)}, the config expects {list(shape)}")


def _staging(out: Path) -> Path:
    from moelab.outpath import check_writable_dir

    check_writable_dir(out)  # names the user's --out, not the staging folder beside it
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoelabError(f"output folder {out} already exists and is not empty; remove it or choose another")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty, checked by _staging
    os.replace(tmp, out)


# ---- transformers -> moelab ---------------------------------------------------------------------------
def import_producer(link: Link, r: TensorReader) -> Callable[[], Iterable[torch.Tensor]]:
    """The moelab tensor of `link`, as row-major chunks (one per expert for stacked experts)."""
    hf, kind = link.hf, link.kind
    if kind == "copy":
        return one(lambda: r.get(hf[0]))
    if kind == "ffn_in":
        return one(lambda: torch.cat([r.get(hf[0]).t(), r.get(hf[1]).t()], dim=1))
    if kind == "ffn_out":
        return one(lambda: r.get(hf[0]).t())
    E = link.shape[0]
    if kind == "experts_in":
        return lambda: (torch.cat([r.get(hf[e]).t(), r.get(hf[E + e]).t()], dim=1) for e in range(E))
    if kind == "experts_out":
        return lambda: (r.get(hf[e]).t() for e in range(E))
    return lambda: (r.row(hf[0], e).t() for e in range(E))  # fused_in / fused_out: [E, X, D] -> [E, D, X]


def import_hf(name_or_path: str | Path, out: str | Path, *, revision: str | None = None) -> Path:
    """Write a moelab checkpoint folder (model.safetensors, config.json, state.json) for a transformers
    Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoint; `moelab.train.checkpoint.load_model` reads it."""
    folder = resolve_hf(name_or_path, revision)
    family, cfg = moelab_config(read_hf_config(folder))
    reader = TensorReader(folder)
    links = model_links(cfg, family, set(reader.keys()))
    expected = {n: s for link in links for n, s in link.hf_shapes().items()}
    inert = inert_tensors(cfg, family)
    optional = list(inert) + (["lm_head.weight"] if cfg.tie_embeddings else [])
    check_tensors(reader, {**expected, **{n: s for n, s in inert.items() if n in reader}}, optional,
                  f"transformers checkpoint {folder}")
    entries = [Entry(link.name, link.shape, reader.dtype(link.hf[0]), import_producer(link, reader))
               for link in links]
    out = Path(out).expanduser()
    tmp = _staging(out)
    try:
        write_streaming(tmp / "model.safetensors", entries, {"format": FORMAT})
        source = {"hf": str(name_or_path), "family": family}
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, "model": cfg.to_dict(),
                                                     "source": source}, indent=2))
        (tmp / "state.json").write_text(json.dumps({"step": 0, "source": source}, indent=2))
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- moelab -> transformers ---------------------------------------------------------------------------
def export_entries(link: Link, r: TensorReader, dtype: torch.dtype) -> list[Entry]:
    """The transformers tensors of one moelab tensor (hub layout: one tensor per expert)."""
    m, kind, shapes = link.name, link.kind, link.hf_shapes()
    F = link.shape[-1] // 2  # ffn_in [D, 2F] and experts_in [E, D, 2F]: gate columns, then up columns
    if kind == "copy":
        makers = [lambda: r.get(m)]
    elif kind == "ffn_in":
        makers = [lambda: r.get(m)[:, :F].t(), lambda: r.get(m)[:, F:].t()]
    elif kind == "ffn_out":
        makers = [lambda: r.get(m).t()]
    elif kind == "experts_in":
        E = link.shape[0]
        makers = [(lambda e=e: r.row(m, e)[:, :F].t()) for e in range(E)]
        makers += [(lambda e=e: r.row(m, e)[:, F:].t()) for e in range(E)]
    else:  # experts_out
        makers = [(lambda e=e: r.row(m, e).t()) for e in range(link.shape[0])]
    return [Entry(name, shapes[name], dtype, one(make)) for name, make in zip(link.hf, makers)]


def _checkpoint_config(path: Path) -> ModelConfig:
    from moelab.train.checkpoint import read_checkpoint_config

    try:
        return ModelConfig.from_dict(read_checkpoint_config(path)["model"], path="model")
    except ConfigError as e:
        raise MoelabError(f"checkpoint {path} has an invalid model config: {e}") from None


def export_hf(checkpoint: str | Path, out: str | Path, *, family: str | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a moelab checkpoint (or a run folder's last one) as a transformers checkpoint folder that
    `AutoModelForCausalLM.from_pretrained` loads; MoelabError names the first setting with no counterpart."""
    from moelab.train.commands import resolve_checkpoint

    ckpt = Path(resolve_checkpoint(checkpoint))
    cfg = _checkpoint_config(ckpt)
    family = choose_family(cfg, family)
    reader = TensorReader(ckpt / "model.safetensors")
    links = model_links(cfg, family)
    check_tensors(reader, {link.name: link.shape for link in links}, [], f"moelab checkpoint {ckpt}")
    dtype = reader.dtype("embed.weight")
    entries = [e for link in links for e in export_entries(link, reader, dtype)]
    entries += [Entry(n, s, dtype, one(lambda s=s: torch.zeros(s, dtype=dtype)))
                for n, s in inert_tensors(cfg, family).items()]
    out = Path(out).expanduser()
    tmp = _staging(out)
    try:
        write_sharded(tmp, entries, max_shard_bytes, {"format": "pt"})
        config = hf_config(cfg, family, dtype=str(dtype).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

