"""Optimizer and RNG state as safetensors + JSON: files a checkpoint can carry without pickle.

`torch.save` writes a pickle, and unpickling a downloaded checkpoint can run any code it names. So the
tensors of a state go into a safetensors file and everything else (step counters, hyper-parameters,
Python's and NumPy's generator words) into a JSON skeleton kept in that file's metadata. Reading
parses bytes and JSON only; a file of the wrong shape is a `MoelabError`, never an executed payload.

  optimizer.safetensors  tensors "state.<param index>.<key>"; metadata "moelab": {"state": {index:
                         {key: plain value}}, "param_groups": [...]} (tensor slots hold null)
  rng.safetensors        tensors "torch", "numpy_key", "cuda.<i>"; metadata "moelab": the rest
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moelab.config import MoelabError

OPTIMIZER_FILE, RNG_FILE = "optimizer.safetensors", "rng.safetensors"
LEGACY_FILES = ("optimizer.pt", "rng.pt")  # pickles written by moelab before 0.2: refused, never read
_META = "moelab"


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON skeleton) of a state file, or a MoelabError naming what is wrong with it."""
    if not path.is_file():
        raise MoelabError(f"{path} is missing: the checkpoint cannot be resumed")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        skeleton = json.loads(meta[_META])
    except Exception as e:  # safetensors raises several types for a truncated or foreign file
        raise MoelabError(f"cannot read {path}: not a moelab state file ({_first_line(e)})") from None
    if not isinstance(skeleton, dict):
        raise MoelabError(f"cannot read {path}: its metadata is not a JSON object")
    return tensors, skeleton


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---- optimizer -------------------------------------------------------------------------------
def save_optimizer_state(osd: dict[str, Any], path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for idx, slots in osd["state"].items():
        state[str(idx)] = {}
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
                state[str(idx)][key] = None
            else:
                state[str(idx)][key] = value
    skeleton = {"state": state, "param_groups": osd["param_groups"]}
    save_file(tensors, str(path), metadata={_META: json.dumps(skeleton)})


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """The optimizer state dict saved by `save_optimizer_state` (tuples in param groups restored)."""
    tensors, skeleton = _read(path)
    try:
        state = {int(idx): {key: tensors[f"state.{idx}.{key}"] if value is None else value
                            for key, value in slots.items()}
                 for idx, slots in skeleton["state"].items()}
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in skeleton["param_groups"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MoelabError(f"cannot read {path}: malformed optimizer state ({_first_line(e)})") from None
    return {"state": state, "param_groups": groups}


def _expected_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape AdamW or Adafactor keeps for state slot `key` of a parameter of `shape`."""
    if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "variance"):
        return shape
    if key == "step":
        return ()
    if key == "row_var" and len(shape) >= 2:
        return (*shape[:-1], 1)
    if key == "col_var" and len(shape) >= 2:
        return (*shape[:-2], 1, shape[-1])
    return None


def check_fits(osd: dict[str, Any], params: list[torch.Tensor], path: Path) -> None:
    """Refuse optimizer state whose slots do not fit the parameters (it would fail mid-step)."""
    for idx, slots in osd["state"].items():
        if not 0 <= idx < len(params):
            raise MoelabError(f"{path}: state for parameter {idx}, but the model has {len(params)}")
        for key, value in slots.items():
            want = _expected_shape(key, tuple(params[idx].shape))
            if want is None or not torch.is_tensor(value) or tuple(value.shape) != want:
                got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise MoelabError(f"{path}: optimizer slot {key} of parameter {idx} is {got}, expected {want}")


# ---- RNG -------------------------------------------------------------------------------------
def save_rng_state(path: Path) -> None:
    kind, key, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(key.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    skeleton = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
                "python": [version, list(words), gauss_next]}
    save_file(tensors, str(path), metadata={_META: json.dumps(skeleton)})


def load_rng_state(path: Path) -> None:
    """Set torch's, NumPy's and Python's generators (and CUDA's, where present) from `path`."""
    tensors, skeleton = _read(path)
    try:
        kind, pos, has_gauss, cached = skeleton["numpy"]
        version, words, gauss_next = skeleton["python"]
        numpy_state = (kind, tensors["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached)
        python_state = (version, tuple(words), gauss_next)
        torch_state = tensors["torch"]
        # Each part is tried on a scratch generator first, so a bad file changes no global state.
        random.Random().setstate(python_state)
        np.random.RandomState().set_state(numpy_state)
        torch.Generator().set_state(torch_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise MoelabError(f"cannot read {path}: malformed RNG state ({_first_line(e)})") from None
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        # Saved for each GPU the writer saw; a machine with fewer restores those it has (set_rng_state_all
        # indexed past them).
        for i, state in enumerate(cuda[:torch.cuda.device_count()]):
            try:
                torch.cuda.set_rng_state(state, i)
            except (RuntimeError, TypeError, ValueError) as e:
                raise MoelabError(f"cannot read {path}: malformed CUDA RNG state {i} ({_first_line(e)})") from None


def refuse_legacy(folder: Path) -> None:
    """A checkpoint from before this format holds pickles: say so rather than unpickle them."""
    if (folder / OPTIMIZER_FILE).is_file():
        return
    found = [name for name in LEGACY_FILES if (folder / name).is_file()]
    if found:
        raise MoelabError(f"{folder / found[0]} is from an older moelab (a pickle, which moelab no longer "
                          f"unpickles, since that can run code): resume from a checkpoint written by this "
                          f"version, or start the run again")
