"""Checkpoints: safetensors weights + optimizer + run config + step + RNG, one directory each.

A checkpoint directory holds `model.safetensors`, `config.json` (the whole run config, plus the corpus
tokenizer's fingerprint), `state.json` (step, tokens seen) and, for resuming, `optimizer.safetensors`
and `rng.safetensors` (see `state_io.py`: nothing in a checkpoint is a pickle). It is written under a
temporary name, fsynced and renamed when complete, so a crash never leaves a half-written checkpoint
under a final name (`rundir.py`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moelab.config import ConfigError, MoelabError
from moelab.model.config import ModelConfig
from moelab.train import state_io
from moelab.train.rundir import fsync_path, fsync_tree

FORMAT = "moelab-checkpoint"


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    fsync_tree(tmp)  # the files' bytes reach the disk before the name that says they are complete
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)


def save_checkpoint(path: str | Path, model: torch.nn.Module, run_config: dict[str, Any], step: int,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> Path:
    """Write a checkpoint under a temporary name and rename it when complete. A write that fails (a full
    disk) removes the temporary folder and says in one line where and how much space is free; every
    earlier checkpoint is left as it was."""
    from safetensors import SafetensorError

    final = Path(path)
    try:
        return _write_checkpoint(final, model, run_config, step, optimizer, extra)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(final.with_name(final.name + ".tmp"), ignore_errors=True)
        raise MoelabError(f"could not write checkpoint {final}: {_reason(e)} ({_free_space(final.parent)} free "
                          f"in {final.parent}); earlier checkpoints are intact") from None


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return "no space left on device" if "StorageFull" in text or "No space left" in text else text[:200]


def _free_space(folder: Path) -> str:
    for p in [folder, *folder.parents]:
        if p.exists():
            free = shutil.disk_usage(p).free
            return f"{free / 2**30:.2f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"
    return "unknown space"


def _write_checkpoint(final: Path, model, run_config, step, optimizer, extra) -> Path:
    tmp = _atomic_dir(final)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    (tmp / "config.json").write_text(json.dumps({"format": FORMAT, **run_config}, indent=2))
    (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    if optimizer is not None:
        state_io.save_optimizer_state(optimizer.state_dict(), tmp / state_io.OPTIMIZER_FILE)
        state_io.save_rng_state(tmp / state_io.RNG_FILE)
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoelabError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or not isinstance(cfg.get("model"), dict):
        raise MoelabError(f"{cfg_file} is not a moelab checkpoint config")
    for key in ("data", "tokenizer"):
        if not isinstance(cfg.get(key, {}), dict):
            raise MoelabError(f"{cfg_file}: {key!r} should be a JSON object")
    for key in ("file", "fingerprint"):  # None: not recorded (a corpus without a fingerprint)
        value = cfg.get("tokenizer", {}).get(key)
        if value is not None and not isinstance(value, str):
            raise MoelabError(f"{cfg_file}: tokenizer.{key} should be a string")
    return cfg


def check_same_tokenizer(ckpt: str | Path, corpus) -> None:
    """Refuse a corpus tokenized by another tokenizer than the checkpoint's (sizes alone can agree)."""
    saved = read_checkpoint_config(ckpt).get("tokenizer", {}).get("fingerprint")
    here = corpus.info["tokenizer"].get("fingerprint")
    if saved and here and saved != here:
        raise MoelabError(f"corpus {corpus.path} was tokenized by another tokenizer (fingerprint {here}) "
                          f"than checkpoint {ckpt} trained with ({saved}): its numbers would mean nothing")


def checkpoint_data(path: str | Path) -> dict[str, Any]:
    """The checkpoint's data settings, validated (a foreign or edited config.json says one line)."""
    from moelab.data.config import DataConfig

    raw = read_checkpoint_config(path).get("data", {})
    try:
        return DataConfig.from_dict(raw, path="data").to_dict() if raw else {}
    except ConfigError as e:
        raise MoelabError(f"{Path(path) / 'config.json'} has invalid data settings: {e}") from None


def checkpoint_step(path: str | Path) -> int:
    state = Path(path) / "state.json"
    if not state.is_file():
        return 0
    try:
        step = json.loads(state.read_text()).get("step")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        step = None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise MoelabError(f"{state} is corrupt: it should hold a non-negative integer \"step\"")
    return step


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(Path(path) / "model.safetensors"))
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise MoelabError(f"cannot read {Path(path) / 'model.safetensors'}: {e}") from None


def check_shapes_fit(own: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], path: str | Path) -> None:
    """Name any missing, extra or mis-shaped tensor of a checkpoint (its names and shapes) against a model's
    state dict, which may live on the meta device."""
    missing = sorted(set(own) - set(shapes))
    extra = sorted(set(shapes) - set(own))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise MoelabError(f"checkpoint {path} does not fit this model: {what}")
    for name, shape in shapes.items():
        if tuple(shape) != tuple(own[name].shape):
            raise MoelabError(f"checkpoint {path}: tensor {name} has shape {tuple(shape)}, "
                              f"the model expects {tuple(own[name].shape)}")


def check_finite(name: str, tensor: torch.Tensor, path: str | Path) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise MoelabError(f"checkpoint {path}: tensor {name} holds NaN or inf (a corrupt or diverged file)")


def check_state_fits(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], path: str | Path) -> None:
    check_shapes_fit(own, {k: tuple(v.shape) for k, v in weights.items()}, path)
    for name, tensor in weights.items():
        check_finite(name, tensor, path)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Copy a checkpoint's weights into a model, naming any missing, extra or mis-shaped tensor."""
    weights = read_weights(path)
    check_state_fits(model.state_dict(), weights, path)
    model.load_state_dict(weights)


def meta_model(path: str | Path) -> torch.nn.Module:
    """The model a checkpoint's config describes, built on the meta device: shapes, no values."""
    from moelab.model.transformer import build_model

    cfg = read_checkpoint_config(path)
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"], path="model")
    except ConfigError as e:
        raise MoelabError(f"checkpoint {path} has an invalid model config: {e}") from None
    with torch.device("meta"):
        return build_model(model_cfg).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A model rebuilt from a checkpoint directory's config and weights, in eval mode.

    The model is built on the meta device and the file's tensors become its parameters: a 7B model's random
    initialisation (about a minute) is never drawn, and the weights are held once, not twice. The global RNG
    is left as it was. On CPU the parameters are the file's pages mapped copy-on-write (PyTorch's own
    meta + mmap + assign recipe): writing a parameter copies its page, but a file overwritten in place (cp
    onto it; moelab and safetensors write a new file and rename it) would change the model under it."""
    return assign_weights(meta_model(path), path).to(device).eval()


def assign_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """A model built on the meta device, its parameters made the checkpoint's tensors (cast to the model's
    dtypes, as load_state_dict's copy would cast them) and the buffers no state dict holds recomputed: no
    random initialisation drawn, the weights held once (see `load_model`)."""
    from moelab.model.transformer import restore_transient_buffers

    own = model.state_dict()
    weights = read_weights(path)
    check_state_fits(own, weights, path)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()}, assign=True)
    del weights
    restore_transient_buffers(model)
    return model


def first_difference(a: Any, b: Any, prefix: str = "model") -> str | None:
    """Dotted path of the first field where two config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:  # config field order: the main fields first
            d = first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
            if d:
                return d
        return None
    return None if a == b else f"{prefix} ({a!r} vs {b!r})"


# How the optimizer runs, not what it computes: chosen by build_optimizer for this machine (fused AdamW on
# CUDA), where torch's load_state_dict would take the writer's (a CPU run's checkpoint resumed unfused).
KERNEL_FLAGS = ("fused", "foreach", "capturable")


def this_machine_s_kernels(osd: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The saved state with each group's kernel flags replaced by the resuming optimizer's, before loading, so
    torch places the step counters where those kernels want them."""
    saved = list(osd.get("param_groups", []))
    groups = [{**old, **{k: now[k] for k in KERNEL_FLAGS if k in now}}
              for old, now in zip(saved, optimizer.param_groups)]
    return {**osd, "param_groups": groups + saved[len(groups):]}  # a count that differs: load_state_dict refuses


def check_architecture(path: str | Path, model_config: dict[str, Any], flag: str) -> Path:
    """Refuse, with one line naming `flag` (--init, --resume), a checkpoint whose model config is invalid or
    is another architecture than `model_config`."""
    path = Path(path)
    saved = read_checkpoint_config(path)
    try:  # normalise through the dataclass so keys added by newer versions compare by their defaults
        saved_model = ModelConfig.from_dict(saved["model"], path="model").to_dict()
    except ConfigError as e:
        raise MoelabError(f"{flag} {path}: checkpoint has an invalid model config: {e}") from None
    diff = first_difference(saved_model, model_config)
    if diff:
        raise MoelabError(f"{flag} {path}: checkpoint is a different architecture: {diff}")
    return path


def check_resumable(path: str | Path, model_config: dict[str, Any]) -> Path:
    """Refuse, with one line, a checkpoint a run of `model_config` cannot continue from: an invalid or
    different model config, a legacy pickle, no optimizer state. Before anything is built or read."""
    path = check_architecture(path, model_config, "--resume")
    state_io.refuse_legacy(path)
    if not (path / state_io.OPTIMIZER_FILE).is_file():
        raise MoelabError(f"--resume {path}: no optimizer state saved there "
                          "(to start a run from its weights, use --init)")
    return path


def resume(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the optimizer and RNG of a checkpoint `check_resumable` passed, into a run whose model already
    holds its weights (`assign_weights`); returns its step."""
    path = Path(path)
    step = checkpoint_step(path)
    osd = state_io.load_optimizer_state(path / state_io.OPTIMIZER_FILE)
    state_io.check_fits(osd, [p for g in optimizer.param_groups for p in g["params"]],
                        path / state_io.OPTIMIZER_FILE)
    try:
        optimizer.load_state_dict(this_machine_s_kernels(osd, optimizer))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise MoelabError(f"--resume {path}: the optimizer state does not fit this run: {e}") from None
    state_io.load_rng_state(path / state_io.RNG_FILE)
    return step
