"""Training steps under router replay: `moelab train --replay FILE`.

Legend: N replayed sequences, B batch rows, S sequence (data.seq_len), L MoE layers, K experts per token.

RL trainers replay the routing their inference engine recorded, so the step trains the experts that made
the sample. Here the batches are the replay's sequences in order: sequence i is row i of the corpus split
the trace was made over (`iter_sequential` rows of data.seq_len tokens, as `trace` and `intervene` read
them), B rows a step, starting again at the first sequence when they run out (epochs). Each micro-batch
runs inside `edit_routing(model, {block: RoutingEdit(force_ids_TK=...)})`: the replayed ids replace the
router's choice, the combine weights are gathered from the router's own probabilities (so the router still
gets a gradient), and a position the replay does not cover (-1) routes normally.
"""

from __future__ import annotations

import contextlib

import torch

from moelab.config import MoelabError
from moelab.data.objectives import iter_sequential
from moelab.intervene.edit import RoutingEdit, edit_routing
from moelab.intervene.replay import batch_edits, check_trace_model, check_tokens, fit_to_model, read_replay_file

ROW_KEYS = ("input_ids", "labels", "domain_id", "lang_id", "doc")


class ReplaySampler:
    """`batch(i)`: rows i*B .. i*B+B-1 of the replayed sequences (modulo N), with `replay_rows` naming them."""

    def __init__(self, corpus, *, seq_len: int, batch_size: int, split: str, path, model):
        seqs, blocks_L, tokens = read_replay_file(path)
        check_trace_model(path, model)
        self.seqs, self.blocks = fit_to_model(seqs, blocks_L, model, str(path))
        parts, rows = [], 0
        for batch in iter_sequential(corpus, seq_len=seq_len, batch_size=batch_size, split=split):
            parts.append(batch)
            rows += batch["input_ids"].shape[0]
            if rows >= len(self.seqs):
                break
        if rows < len(self.seqs):
            raise MoelabError(f"{path} holds {len(self.seqs)} sequences, split {split!r} has only {rows} rows of "
                              f"{seq_len} tokens: it is not a replay of this corpus (same corpus and split?)")
        self.rows = {k: torch.cat([p[k] for p in parts])[: len(self.seqs)] for k in ROW_KEYS if k in parts[0]}
        check_tokens(tokens, 0, self.rows["input_ids"], str(path))
        self.batch_size, self.path, self.split = batch_size, str(path), split

    def __len__(self) -> int:
        return len(self.seqs)

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        rows_B = torch.arange(i * self.batch_size, (i + 1) * self.batch_size) % len(self.seqs)
        return {**{k: v[rows_B] for k, v in self.rows.items()}, "replay_rows": rows_B}

    def edits(self, batch: dict[str, torch.Tensor], shard=lambda x: x) -> dict[int, RoutingEdit]:
        """Forced ids of a batch's rows, for the MoE blocks the replay covers."""
        rows_B = shard(batch["replay_rows"])
        B, S = rows_B.shape[0], batch["input_ids"].shape[1]
        return batch_edits([self.seqs[int(r)] for r in rows_B], 0, B, S, self.blocks)


def replay_routing(model, sampler, batch, shard=lambda x: x):
    """The context a training micro-batch runs in: its replayed routing, or nothing without a replay."""
    if not isinstance(sampler, ReplaySampler):
        return contextlib.nullcontext()
    return edit_routing(model, sampler.edits(batch, shard))
