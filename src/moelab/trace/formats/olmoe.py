"""OLMoE's routing-analysis JSONL (allenai/OLMoE, scripts/run_moe_analysis.py, `c4_results*.jsonl`).

One line per sequence: {"input_ids": [T], "predicted_token_ids": [T], "exp_ids": [T][K][L]}, where
exp_ids[t][r][l] is the expert of rank r (by router logit, highest first) at token t in layer l. It keeps
the token ids; it has no probabilities or combine weights, and does not record E (64 for OLMoE-1B-7B).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from moelab.config import MoelabError
from moelab.trace.formats.routed import Routed, jsonl_records
from moelab.trace.formats.values import MAX_EXPERTS, MAX_TOKEN, int_array

WHAT_LACKS = "lines without input_ids carry no token ids "


def read_olmoe(path: str | Path) -> Iterator[Routed]:
    path = Path(path)
    if not path.is_file():
        raise MoelabError(f"OLMoE routing file not found: {path}")
    for where, rec in jsonl_records(path, ("exp_ids",), "an OLMoE routing line"):
        ids_TKL = int_array(rec["exp_ids"], 3, where, "exp_ids (tokens, top_k, layers)", 0, MAX_EXPERTS - 1)
        tokens = None if rec.get("input_ids") is None else int_array(rec["input_ids"], 1, where, "input_ids",
                                                                      0, MAX_TOKEN)
        if not ids_TKL.size:
            raise MoelabError(f"{where}: exp_ids has shape {ids_TKL.shape}: no tokens, experts or layers")
        if tokens is not None and tokens.shape != (len(ids_TKL),):
            raise MoelabError(f"{where}: {len(ids_TKL)} tokens in exp_ids but input_ids has shape {tokens.shape}")
        yield Routed(ids_TKL.transpose(0, 2, 1), tokens, where)
