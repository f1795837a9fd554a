"""Fixtures for the report tests: planted traces on disk, checkpoint series, and an HTML reader."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from moelab.analysis.synthetic import planted_batches
from moelab.trace.io import TraceWriter
from moelab.trace.schema import TraceMeta

L, E, K = 2, 4, 2
SEQ_LEN = 32
CONFIG = {"max_seq_len": SEQ_LEN, "moe": {"router": {"kind": "linear"}}}


def shifted(batch: dict, frac: float, seed: int) -> dict:
    """The same rows with a share `frac` of tokens moved to the next expert ids (ids stay distinct)."""
    rng = np.random.default_rng(seed)
    key = (batch["seq"].astype(np.int64) << 32) | batch["pos"]
    _, inv = np.unique(key, return_inverse=True)
    flip = rng.random(inv.max() + 1) < frac
    out = dict(batch)
    out["expert"] = np.where(flip[inv], (batch["expert"] + 1) % E, batch["expert"]).astype(np.int16)
    return out


def write_planted(path: Path, rule: str = "token", *, step: int | None = None, config: dict | None = None,
                  shift: float = 0.0, all_experts: bool = True, num_seqs: int = 24, seed: int = 1) -> Path:
    meta = TraceMeta(num_experts=[E] * L, top_k=K, capacity_factor=1.0, capacity_formula="topk",
                     drop_policy="openmoe", checkpoint_step=step, model_config=CONFIG if config is None else config)
    with TraceWriter(path, meta) as writer:
        for i, batch in enumerate(planted_batches(num_seqs=num_seqs, seq_len=SEQ_LEN, num_layers=L, num_experts=E,
                                                  top_k=K, rule=rule, vocab=30, seqs_per_batch=8, seed=seed,
                                                  capacity_factor=1.0, all_experts=all_experts)):
            writer.write(shifted(batch, shift, i) if shift else batch)
    return path


@pytest.fixture
def planted(tmp_path):
    return lambda name="trace.parquet", **kw: write_planted(tmp_path / name, **kw)


def html_sections(page: str) -> dict[str, int]:
    """Heading text -> number of embedded images until the next heading (repeated titles get ' #2')."""
    out: dict[str, int] = {}
    pieces = re.split(r"<h[23][^>]*>(.*?)</h[23]>", page)
    for title, body in zip(pieces[1::2], pieces[2::2]):
        name, i = title, 2
        while name in out:
            name, i = f"{title} #{i}", i + 1
        out[name] = body.count("<img ")
    return out


def assert_self_contained(page: str) -> None:
    assert "data:image/png;base64," in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
