"""Planted routing traces with known answers, for testing and benchmarking the analyses.

`planted_batches` yields trace batches (dicts of numpy arrays in the trace's (seq, pos, layer, rank) row
order, list columns over the rank-0 rows) whose router follows a chosen rule:
- "token": the experts are a function of the token ID (vocabulary specialisation 1, position ~0);
- "position": a function of the position (the reverse);
- "domain": a function of the sequence's domain;
- "uniform": i.i.d. random logits (every specialisation sits at its null);
- "skewed": i.i.d. draws from an unequal expert load (`load`, default [.35 .25 .1 .1 .05 .05 .05 .05]
  for E = 8, else a geometric load), independent of token, position and domain: the case where
  uniform-routing nulls call load imbalance specialisation;
- "late": skewed routing whose last quarter of positions also favours expert 0 (log-odds +`late_shift`):
  a real late-position routing shift, for the drop baseline.
Generation is pure (no I/O); a `TraceWriter` turns it into a file.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from moelab.analysis.drops import simulate_drops

RULES = ("token", "position", "domain", "uniform", "skewed", "late")
SKEWED_LOAD = (0.35, 0.25, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05)


def skewed_load(num_experts: int) -> np.ndarray:
    """The default unequal load: the issue's eight-expert load, or a geometric one (ratio 0.7)."""
    if num_experts == len(SKEWED_LOAD):
        return np.asarray(SKEWED_LOAD)
    w = 0.7 ** np.arange(num_experts)
    return w / w.sum()


def _planted_logits(rule: str, tokens_SP: np.ndarray, domain_S: np.ndarray, L: int, E: int, K: int,
                    rng: np.random.Generator, late_shift: float = 2.0) -> np.ndarray:
    """S x P x L x E logits whose top-k is the rule's choice (ranks by a 1.0 logit gap) plus small noise."""
    S, P = tokens_SP.shape
    if rule == "uniform":
        return rng.standard_normal((S, P, L, E))
    if rule in ("skewed", "late"):
        # log-load plus Gumbel noise: the top-k is a draw without replacement proportional to the load
        logits = np.log(skewed_load(E)) + rng.gumbel(size=(S, P, L, E))
        if rule == "late":
            logits[:, (3 * P) // 4:, :, 0] += late_shift
        return logits
    source = {"token": tokens_SP * 7, "position": np.broadcast_to(np.arange(P), (S, P)),
              "domain": np.broadcast_to(domain_S[:, None] * 3, (S, P))}[rule]
    first_SPL = (source[:, :, None] + np.arange(L)) % E
    logits = 0.05 * rng.standard_normal((S, P, L, E))
    for r in range(K):
        np.put_along_axis(logits, ((first_SPL + r) % E)[..., None], 8.0 - r, axis=3)
    return logits


def planted_batches(*, num_seqs: int, seq_len: int, num_layers: int, num_experts: int, top_k: int,
                    rule: str = "token", vocab: int = 1000, seqs_per_batch: int = 16, seed: int = 0,
                    domains: Sequence[str] = ("web", "code"), dead_expert: int | None = None,
                    capacity_factor: float | None = None, all_experts: bool = False) -> Iterator[dict]:
    """Batches of `seqs_per_batch` sequences; with `capacity_factor`, drops follow OpenMoE's rule per batch.

    `all_experts` adds expert_norms (growing with the router probability), expert_cos and expert_density.
    """
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} is not one of {RULES}")
    rng = np.random.default_rng(seed)
    L, E, K = num_layers, num_experts, top_k
    for s0 in range(0, num_seqs, seqs_per_batch):
        S, P = min(seqs_per_batch, num_seqs - s0), seq_len
        tokens_SP = rng.integers(0, vocab, size=(S, P))
        domain_S = (np.arange(s0, s0 + S) % len(domains))
        logits = _planted_logits(rule, tokens_SP, domain_S, L, E, K, rng)
        if dead_expert is not None:
            logits[..., dead_expert] = -np.inf
        probs = np.exp(logits - logits.max(axis=3, keepdims=True))
        probs /= probs.sum(axis=3, keepdims=True)
        ids = np.argsort(-probs, axis=3, kind="stable")[..., :K]  # S x P x L x K
        prob = np.take_along_axis(probs, ids, axis=3)
        dropped = np.zeros(ids.shape, dtype=bool)
        if capacity_factor is not None:
            for l in range(L):
                dropped[:, :, l] = simulate_drops(ids[:, :, l].reshape(-1, K), prob[:, :, l].reshape(-1, K), E,
                                                  capacity_factor).reshape(S, P, K)
        yield _rows(s0, tokens_SP, domain_S, domains, ids, prob, dropped, probs, all_experts, rng)


def _rows(s0: int, tokens_SP: np.ndarray, domain_S: np.ndarray, domains: Sequence[str], ids: np.ndarray,
          prob: np.ndarray, dropped: np.ndarray, probs: np.ndarray, all_experts: bool,
          rng: np.random.Generator) -> dict:
    S, P, L, K = ids.shape
    E = probs.shape[3]
    shape = (S, P, L, K)
    seq = np.broadcast_to((s0 + np.arange(S))[:, None, None, None], shape).reshape(-1)
    pos = np.broadcast_to(np.arange(P)[None, :, None, None], shape).reshape(-1)
    layer = np.broadcast_to(np.arange(L)[None, None, :, None], shape).reshape(-1)
    rank = np.broadcast_to(np.arange(K), shape).reshape(-1)
    batch = {
        "seq": seq.astype(np.int64), "pos": pos.astype(np.int32), "doc_pos": pos.astype(np.int32),
        "token": np.broadcast_to(tokens_SP[:, :, None, None], shape).reshape(-1).astype(np.int32),
        "doc": seq.astype(np.int64),
        "domain": np.broadcast_to(domain_S[:, None, None, None], shape).reshape(-1).astype(np.int32),
        "domain.names": np.asarray(domains, dtype=object),
        "lang": np.zeros(seq.size, np.int32), "lang.names": np.asarray(["en"], dtype=object),
        "turn": np.full(seq.size, -1, np.int16), "layer": layer.astype(np.int16),
        "block": (2 * layer + 1).astype(np.int16), "rank": rank.astype(np.int8),
        "expert": ids.reshape(-1).astype(np.int16),
        "weight": np.where(dropped, 0.0, prob).reshape(-1).astype(np.float32),
        "prob": prob.reshape(-1).astype(np.float32), "dropped": dropped.reshape(-1),
        "probs": probs.reshape(-1, E).astype(np.float32),
    }
    if all_experts:
        n = S * P * L
        batch["expert_norms"] = (probs.reshape(n, E) + 0.01 * rng.random((n, E))).astype(np.float32)
        batch["expert_cos"] = rng.uniform(-0.2, 0.6, size=(n, E * (E - 1) // 2)).astype(np.float32)
        batch["expert_density"] = rng.uniform(0.4, 0.6, size=(n, E)).astype(np.float32)
    rows0 = np.flatnonzero(rank == 0)
    for name in ("probs", "expert_norms", "expert_cos", "expert_density"):
        if name in batch:
            batch[f"{name}.rows"] = rows0
    return batch


def clustered_batch(seed: int, *, num_seqs: int = 64, seq_len: int = 128, num_layers: int = 1, num_experts: int = 8,
                    top_k: int = 2, topics: int = 4, topic_sd: float = 1.5, vocab: int = 50,
                    ids_per_seq: int | None = None, token_sd: float = 0.0, domain_sd: float = 0.0,
                    noise_sd: float = 0.0, docs_per_seq: int = 1, population_seed: int = 12345,
                    noise_seed: int | None = None) -> dict:
    """One batch of a trace whose tokens are routed alike within a sequence, as a language model routes a
    document: logits = topic[z_s] (one of `topics` per sequence) + token_sd * token[v] + domain_sd *
    domain[d] + noise_sd * N(0, 1), then top-k. The topic, token and domain tables are the population
    (`population_seed`: the same in every trace); the sequence's topic, its documents' domains (two,
    drawn at random per document, apart from the topic) and its tokens are this trace's draws.

    `ids_per_seq`: bursty text, each sequence drawing its tokens from its own that many IDs of `vocab`
    (a document repeats its words); else every token uniform over `vocab`. With token_sd = domain_sd = 0
    the routing ignores token IDs and domains, and a null that keeps sequences whole must find nothing.
    `noise_seed` draws the noise apart from the rest: two calls that differ only in it route the same
    tokens by the same rule with independent noise (two checkpoints that agree on context, not on tokens).
    `doc` numbers the documents (`docs_per_seq` equal runs a sequence), `domain` is per document."""
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(population_seed)
    L, E, K, S, P = num_layers, num_experts, top_k, num_seqs, seq_len
    topic_ZLE = fixed.normal(0.0, topic_sd, (topics, L, E))
    token_VLE = fixed.normal(0.0, 1.0, (vocab, L, E))
    domain_DLE = fixed.normal(0.0, 1.0, (2, L, E))
    z_S = rng.integers(0, topics, S)
    doc_SP = np.minimum(np.arange(P) // max(1, P // docs_per_seq), docs_per_seq - 1)[None].repeat(S, 0)
    dom_SP = rng.integers(0, 2, (S, docs_per_seq))[np.arange(S)[:, None], doc_SP]
    if ids_per_seq:
        own_SV = np.stack([rng.choice(vocab, ids_per_seq, replace=False) for _ in range(S)])
        tokens = own_SV[np.arange(S)[:, None], rng.integers(0, ids_per_seq, (S, P))]
    else:
        tokens = rng.integers(0, vocab, (S, P))
    logits = topic_ZLE[z_S][:, None] + token_sd * token_VLE[tokens] + domain_sd * domain_DLE[dom_SP]
    if noise_sd:
        noise_rng = rng if noise_seed is None else np.random.default_rng([seed, noise_seed])
        logits = logits + noise_sd * noise_rng.standard_normal((S, P, L, E))
    probs = np.exp(logits - logits.max(axis=3, keepdims=True))
    probs /= probs.sum(axis=3, keepdims=True)
    ids = np.argsort(-probs, axis=3, kind="stable")[..., :K]
    batch = _rows(0, tokens, np.zeros(S, np.int64), ("web", "code"), ids, np.take_along_axis(probs, ids, axis=3),
                  np.zeros(ids.shape, bool), probs, False, rng)
    per_row = (S, P, L, K)
    batch["domain"] = np.broadcast_to(dom_SP[:, :, None, None], per_row).reshape(-1).astype(np.int32)
    batch["doc"] = batch["seq"] * docs_per_seq + np.broadcast_to(doc_SP[:, :, None, None], per_row).reshape(-1)
    return batch
