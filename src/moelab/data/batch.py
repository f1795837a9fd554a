"""The batch layout every sampler fills (see `objectives.py` for the keys' meaning) and its helpers.

Its own module so that the samplers (`objectives.py`, `ul2.py`) depend on it one way, not on each other.
"""

from __future__ import annotations

import numpy as np
import torch

from moelab.config import MoelabError

IGNORE_INDEX = -100
META_KEYS = ("doc", "pos", "domain_id", "lang_id", "turn")
BATCH_KEYS = ("input_ids", "labels", *META_KEYS)
_DTYPES = {"input_ids": np.int64, "labels": np.int64, "doc": np.int64, "pos": np.int64,
           "domain_id": np.int16, "lang_id": np.int16, "turn": np.int16, "denoiser": np.int16}


def empty_batch(rows: int, seq_len: int, pad_id: int, keys=BATCH_KEYS) -> dict[str, np.ndarray]:
    """An all-padding batch: pad_id inputs, ignored labels, -1 metadata."""
    out = {k: np.full((rows, seq_len), -1, _DTYPES[k]) for k in keys}
    out["input_ids"][:] = pad_id
    out["labels"][:] = IGNORE_INDEX
    return out


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def check_shape(seq_len: int, batch_size: int) -> None:
    if seq_len < 2 or batch_size < 1:
        raise MoelabError(f"seq_len={seq_len} must be >= 2 and batch_size={batch_size} >= 1")
