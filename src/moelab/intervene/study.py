"""Studies over a corpus: expert ablation (per-token loss deltas, per-domain intervals, Holm), top-k and
capacity sweeps. Model runs live in runner.py; the numbers here come from stats.py.

Legend: N predicted tokens kept, M ablation targets, B batch rows, S sequence.
A predicted token is position t + 1 of a row whose label is not ignored; its domain and language are its
own, its sequence is the batch row (numbered across batches), the unit every interval resamples.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from moelab.intervene.edit import RoutingEdit
from moelab.intervene import runner
from moelab.intervene.stats import (bootstrap_mean, flips_for_family, holm, seq_totals, sign_flip_p,
                                    sign_flip_p_many)


@dataclasses.dataclass
class Tokens:
    seq: np.ndarray
    pos: np.ndarray
    domain: np.ndarray
    lang: np.ndarray

    @property
    def num_seqs(self) -> int:
        return int(self.seq.max()) + 1 if len(self.seq) else 0


def take_batches(batches, max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """The first batches holding `max_tokens` predicted tokens (the last one cut at that count)."""
    kept, seen = [], 0
    for batch in batches:
        labels = batch["labels"].clone()
        valid = labels[:, 1:] != -100
        over = torch.cumsum(valid.reshape(-1).long(), 0).view_as(valid) > max_tokens - seen
        labels[:, 1:] = labels[:, 1:].masked_fill(over, -100)
        kept.append({**batch, "labels": labels})
        seen += int((valid & ~over).sum())
        if seen >= max_tokens:
            break
    return kept


def batch_tokens(batch, seq_offset: int) -> tuple[torch.Tensor, Tokens]:
    valid_BS = batch["labels"][:, 1:] != -100
    B, S1 = valid_BS.shape
    v = valid_BS.reshape(-1).numpy()
    seq = (seq_offset + np.repeat(np.arange(B), S1))[v]
    pos = np.tile(np.arange(1, S1 + 1), B)[v]
    dom = batch["domain_id"][:, 1:].reshape(-1).numpy()[v].astype(np.int64)
    lang = batch["lang_id"][:, 1:].reshape(-1).numpy()[v].astype(np.int64)
    return valid_BS, Tokens(seq, pos, dom, lang)


def _cat_tokens(parts: list[Tokens]) -> Tokens:
    return Tokens(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Tokens)))


def run_ablation(model, batches, targets, cf, reuse: bool = True, ops=runner, ablate_capacity="recompute"):
    """(tokens, base loss [N], deltas [M, N]) of masking each target's experts. `ops`: the runner module of
    the model's kind (runner.py for moelab, hf_runner.py for transformers), here and below."""
    device = next(model.parameters()).device
    toks, base, deltas, offset = [], [], [[] for _ in targets], 0
    for batch in batches:
        valid_BS, t = batch_tokens(batch, offset)
        offset += batch["input_ids"].shape[0]
        b, losses = ops.ablation_losses(model, batch["input_ids"].to(device), batch["labels"], targets, cf, reuse,
                                           ablate_capacity)
        keep = valid_BS.to(b.device)
        toks.append(t)
        base.append(b[keep].cpu().numpy())
        for m, loss in enumerate(losses):
            deltas[m].append((loss[keep] - b[keep]).cpu().numpy())
    return _cat_tokens(toks), np.concatenate(base), np.stack([np.concatenate(d) for d in deltas])


def naee_targets(block: int, num_experts: int, keep: int) -> list[tuple[int, tuple[int, ...]]]:
    """NAEE's exhaustive search: every way to keep `keep` of a block's experts, as the experts removed."""
    from itertools import combinations

    return [(block, tuple(e for e in range(num_experts) if e not in kept))
            for kept in combinations(range(num_experts), keep)]


def naee_best(tokens: Tokens, deltas_MN: np.ndarray, targets, names, n_boot=1000, seed=0) -> dict:
    """The kept set whose removal of the others costs the least loss, with every subset's mean change."""
    means = deltas_MN.mean(1)
    best = int(np.argmin(means))
    return {"removed": list(targets[best][1]), "effect": effect_summary(tokens, deltas_MN[best], names, n_boot, seed),
            "subsets": [{"removed": list(e), "delta": float(m)} for (_, e), m in zip(targets, means)]}


def effect_summary(tokens: Tokens, values_N: np.ndarray, names: dict[str, list[str]], n_boot: int,
                   seed: int, test: bool = True, flips: int = 2000) -> dict:
    """Token-weighted mean with a 95% bootstrap interval over sequences: overall, per domain, per language
    (+ p overall). The p-value tests the same token-weighted mean (sign flips of per-sequence sums), so
    interval and test never disagree about which mean they are for."""
    def one(mask_N):
        sums, counts = seq_totals(tokens.seq[mask_N], values_N[mask_N], tokens.num_seqs)
        mean, lo, hi = bootstrap_mean(sums, counts, n_boot, seed)
        return {"mean": mean, "lo": lo, "hi": hi, "tokens": int(mask_N.sum())}

    out = {"all": one(np.ones(len(values_N), bool))}
    if test:
        sums, counts = seq_totals(tokens.seq, values_N, tokens.num_seqs)
        out["all"]["p"] = sign_flip_p(sums[counts > 0], n_perm=flips, seed=seed)
    for label in ("domain", "lang"):
        codes = getattr(tokens, label)
        out[label] = {names[label][c]: one(codes == c) for c in np.unique(codes)}
    return out


def ablation_results(tokens, deltas_MN, targets, names, n_boot=1000, seed=0, flips=None) -> list[dict]:
    """Per target: effect_summary, with Holm over all targets. `flips` None: sized for the family
    (flips_for_family), so the Holm floor M/(flips+1) never hides an effect."""
    flips = flips or flips_for_family(len(targets))
    rows = [{"block": b, "experts": list(e), **effect_summary(tokens, d, names, n_boot, seed, test=False)}
            for (b, e), d in zip(targets, deltas_MN)]
    # Every target's test in one pass over the same flips (effect_summary's test, column by column).
    totals = [seq_totals(tokens.seq, d, tokens.num_seqs) for d in deltas_MN]
    if totals:
        has_S = totals[0][1] > 0  # the same tokens for every target
        p_M = sign_flip_p_many(np.stack([sums[has_S] for sums, _ in totals], 1), n_perm=flips, seed=seed)
        for r, p in zip(rows, p_M):
            r["all"]["p"] = float(p)
    adjusted = holm(np.array([r["all"]["p"] for r in rows]))
    for r, p in zip(rows, adjusted):
        r["all"]["p_holm"] = float(p)
    return rows


def run_sweep(model, batches, edits: dict[str, RoutingEdit], cf, names, n_boot=1000, seed=0, ops=runner) -> dict:
    """Loss per named edit (applied to every MoE block): intervals per domain, its delta vs no edit, drops."""
    device = next(model.parameters()).device
    losses = {name: [] for name in ["none", *edits]}
    drops = {name: [] for name in losses}
    toks, offset = [], 0
    for batch in batches:
        valid_BS, t = batch_tokens(batch, offset)
        offset += batch["input_ids"].shape[0]
        toks.append(t)
        ids = batch["input_ids"].to(device)
        for name, edit in [("none", RoutingEdit()), *edits.items()]:
            loss, dropped = ops.sweep_loss(model, ids, batch["labels"], edit, cf)
            losses[name].append(loss[valid_BS.to(loss.device)].cpu().numpy())
            drops[name].append(dropped)
    tokens = _cat_tokens(toks)
    base = np.concatenate(losses["none"])
    out = {}
    for name, parts in losses.items():
        loss_N = np.concatenate(parts)
        out[name] = {"loss": effect_summary(tokens, loss_N, names, n_boot, seed, test=False),
                     "delta": effect_summary(tokens, loss_N - base, names, n_boot, seed, test=False),
                     "dropped": float(np.mean(drops[name]))}
    return out


def topk_edits(num_experts: int) -> dict[str, RoutingEdit]:
    return {f"k={k}": RoutingEdit(top_k=k) for k in range(1, num_experts + 1)}


def capacity_edits(factors: list[float | None], policies: list[str]) -> dict[str, RoutingEdit]:
    return {f"cf={'none' if f is None else f},{p}": RoutingEdit(capacity_factor=f, drop_policy=p)
            for f in factors for p in policies}


def cosine_study(model, batches, cf, ops=runner) -> dict[int, dict[str, float]]:
    """k=1 vs own-k / all-experts output cosines per MoE block, token-weighted over batches."""
    device = next(model.parameters()).device
    total: dict[int, dict[str, float]] = {}
    n = 0
    for batch in batches:
        valid_T = (batch["doc"] >= 0).reshape(-1).to(device)
        w = int(valid_T.sum())
        for block, cos in ops.k_cosines(model, batch["input_ids"].to(device), valid_T, cf).items():
            acc = total.setdefault(block, {k: 0.0 for k in cos})
            for k, v in cos.items():
                acc[k] += v * w
        n += w
    return {b: {k: v / n for k, v in d.items()} for b, d in total.items()}



def prepare_replay(model, batches, path):
    """Read a replay file and check it against the model and the corpus rows it will replay."""
    from moelab.intervene.replay import check_trace_model, check_tokens, fit_to_model, read_replay_file

    seqs, blocks_L, tokens = read_replay_file(path)
    check_trace_model(path, model)
    seqs, blocks = fit_to_model(seqs, blocks_L, model, str(path))
    offset = 0
    for batch in batches:
        check_tokens(tokens, offset, batch["input_ids"], str(path))
        offset += batch["input_ids"].shape[0]
    return {"path": str(path), "seqs": seqs, "blocks": blocks}


@torch.no_grad()
def run_replay(model, batches, replay: dict, cf, names, n_boot=1000, seed=0, ops=runner) -> dict:
    """Loss with routing replayed (`prepare_replay`; sequence i = corpus row i) beside the model's own, and
    the share of (token, layer) routes the replay changed among those it covers inside the --tokens cut
    (`coverage`: how many that is of the routes run there)."""
    from moelab.intervene.replay import batch_edits
    from moelab.intervene.runner import token_loss

    seqs, blocks = replay["seqs"], replay["blocks"]
    device = next(model.parameters()).device
    toks, own, replayed, changed, routes, run, offset = [], [], [], 0, 0, 0, 0
    for batch in batches:
        B, S = batch["input_ids"].shape
        valid_BS, t = batch_tokens(batch, offset)
        edits = batch_edits(seqs, offset, B, S, blocks)
        # a route counts when it feeds a kept prediction: position s predicts s + 1 (the --tokens cut)
        keep_T = torch.cat([valid_BS, torch.zeros(B, 1, dtype=torch.bool)], 1).reshape(-1)
        base, out, c, r = ops.replay_pass(model, batch["input_ids"].to(device), edits, cf, keep_T)
        changed, routes, run = changed + c, routes + r, run + int(keep_T.sum()) * len(blocks)
        keep = valid_BS.to(device)
        own.append(token_loss(base, batch["labels"])[keep].cpu().numpy())
        replayed.append(token_loss(out, batch["labels"])[keep].cpu().numpy())
        toks.append(t)
        offset += B
    tokens_all, own_N, rep_N = _cat_tokens(toks), np.concatenate(own), np.concatenate(replayed)
    return {"file": replay["path"],
            # of the routes the replay covers inside the cut; nan when it covers none (nothing to compare)
            "routes_changed": changed / routes if routes else float("nan"),
            "coverage": {"routes": routes, "of": run, "share": routes / run if run else float("nan")},
            "loss": effect_summary(tokens_all, rep_N, names, n_boot, seed, test=False),
            "delta": effect_summary(tokens_all, rep_N - own_N, names, n_boot, seed)}
