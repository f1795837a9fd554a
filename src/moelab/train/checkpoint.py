"""Checkpoints: safetensors weights + optimizer + run config + step + RNG, one directory each.

A checkpoint directory holds `model.safetensors`, `config.json` (the whole run config), `state.json`
(step, tokens seen) and, for resuming, `optimizer.pt` and `rng.pt`. It is written under a temporary name
and renamed when complete, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moelab.config import ConfigError, MoelabError
from moelab.model.config import ModelConfig

FORMAT = "moelab-checkpoint"


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, model: torch.nn.Module, run_config: dict[str, Any], step: int,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> Path:
    final = Path(path)
    tmp = _atomic_dir(final)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    (tmp / "config.json").write_text(json.dumps({"format": FORMAT, **run_config}, indent=2))
    (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
    _commit_dir(tmp, final)
    return final


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.exists():
        raise MoelabError(f"checkpoint not found: {path}")
    if not cfg_file.is_file() or not (path / "model.safetensors").is_file():
        raise MoelabError(f"{path} is not a moelab checkpoint (needs config.json and model.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise MoelabError(f"{cfg_file} is not valid JSON: {e}") from None
    if cfg.get("format") != FORMAT or "model" not in cfg:
        raise MoelabError(f"{cfg_file} is not a moelab checkpoint config")
    return cfg


def checkpoint_step(path: str | Path) -> int:
    state = Path(path) / "state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Copy a checkpoint's weights into a model, naming any missing, extra or mis-shaped tensor."""
    try:
        weights = load_file(str(Path(path) / "model.safetensors"))
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise MoelabError(f"cannot read {Path(path) / 'model.safetensors'}: {e}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise MoelabError(f"checkpoint {path} does not fit this model: {what}")
    for name, tensor in weights.items():
        if tensor.shape != own[name].shape:
            raise MoelabError(f"checkpoint {path}: tensor {name} has shape {tuple(tensor.shape)}, "
                              f"the model expects {tuple(own[name].shape)}")
    model.load_state_dict(weights)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A model rebuilt from a checkpoint directory's config and weights, in eval mode."""
    from moelab.model.transformer import build_model

    cfg = read_checkpoint_config(path)
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"], path="model")
    except ConfigError as e:
        raise MoelabError(f"checkpoint {path} has an invalid model config: {e}") from None
    model = build_model(model_cfg)
    load_weights(model, path)
    return model.to(device).eval()


def first_difference(a: Any, b: Any, prefix: str = "model") -> str | None:
    """Dotted path of the first field where two config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:  # config field order: the main fields first
            d = first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
            if d:
                return d
        return None
    return None if a == b else f"{prefix} ({a!r} vs {b!r})"


def resume(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           model_config: dict[str, Any]) -> int:
    """Load weights, optimizer and RNG from a checkpoint of the same architecture; returns its step."""
    path = Path(path)
    saved = read_checkpoint_config(path)
    try:  # normalise through the dataclass so keys added by newer versions compare by their defaults
        saved_model = ModelConfig.from_dict(saved["model"], path="model").to_dict()
    except ConfigError as e:
        raise MoelabError(f"--resume {path}: checkpoint has an invalid model config: {e}") from None
    diff = first_difference(saved_model, model_config)
    if diff:
        raise MoelabError(f"--resume {path}: checkpoint is a different architecture: {diff}")
    if not (path / "optimizer.pt").is_file():
        raise MoelabError(f"--resume {path}: no optimizer state saved there")
    load_weights(model, path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return checkpoint_step(path)
