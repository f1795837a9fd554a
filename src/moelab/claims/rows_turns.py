"""OpenMoE's drop towards the end, on multi-turn text: a long-context tiny-moe traced on real conversations.

OpenMoE was pretrained on web text and code with 2048-token sequences and then read MT-Bench
conversations; the later positions of those long chats lost far more choices to full experts. The paper's
rise starts near position 750, so the row needs sequences of at least 2048 tokens: the base runs (128 or
256 tokens) cannot show it. Here tiny-moe is trained per seed at 2048 tokens per sequence (`long_run`:
the base runs' tokens per step, in fewer, longer rows; the capacity group is the training batch, as in
OpenMoE) on the main corpus, then reads the `turns:doctest` conversations (the interpreter sessions of
Python's own docstrings and reference topics, input / reply turns; `data/turns.py`), tokenized with the
main corpus's tokenizer, in 2048-token rows. The trace keeps the trained capacity (factor, formula,
OpenMoE's queue, the training batch as capacity group). The statistic is the paper's: the raw rise of the
dropped share from the first to the last quarter of positions. The rise the queue alone produces for the
same load (positions shuffled within sequences, re-simulated) is a detail, not subtracted: the queue
filling up late in a batch is the mechanism OpenMoE describes.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from moelab.claims.fingerprint import code_closure
from moelab.claims.models import final, millions, param_counts
from moelab.claims.record import ClaimResult
from moelab.claims.registry import row
from moelab.claims.verdict import Claim, Measure, Precondition
from moelab.claims.workspace import Workspace

TURN_SOURCES = ("turns:doctest",)
HELDOUT = 0.9  # the corpus is only read, never trained on: keep nearly all of it in the traced split
SHOWN_TURNS = 12  # details list the dropped share of turns 0..11 (longer sessions are few)


def turns_corpus(ws: Workspace) -> Path:
    """The conversations, tokenized with the main corpus's tokenizer (so the base runs can read them)."""
    from moelab.data.build import build_corpus

    main = ws.corpus()
    import json

    # The fingerprint, not only the path: a rebuilt main corpus must rebuild this one too.
    fingerprint = json.loads((main / "corpus.json").read_text())["tokenizer"]["fingerprint"]
    settings = {"sources": list(TURN_SOURCES), "tokenizer": str(main / "tokenizer.json"),
                "fingerprint": fingerprint, "heldout": HELDOUT, "python": platform.python_version(),
                "code": code_closure("moelab.data.build")}

    def make(folder: Path) -> None:
        ws.log(f"[claims] corpus turns-doctest: {', '.join(TURN_SOURCES)} with the main tokenizer")
        build_corpus(folder / "corpus", list(TURN_SOURCES), main / "tokenizer.json", heldout_fraction=HELDOUT,
                     seed=0)

    # The workspace's cache (stamp + lock) for a corpus that ws.corpus() cannot describe (a given tokenizer).
    return ws._cached(ws.root / "corpora" / "turns-doctest", settings, make) / "corpus"


def _estimate(model: dict, key: str) -> dict | None:
    h = model["headline"].get(key)
    return None if h is None else h.get("estimate")


def _per_seed(model: dict) -> dict:
    """One seed's drop numbers: overall share, first / last quarter, rise, queue-only rise, excess, turns."""
    drops = model["analyses"].get("drops") or {}
    queue = model["analyses"].get("queue:trained") or {}
    rise, excess = _brief(_estimate(model, "drop_share_end")), _brief(_estimate(model, "drop_share_excess"))
    turns = [int(t) for t in drops.get("turns", [])]
    by_turn, queue_by_turn = (dict(list(zip(turns, shares))[:SHOWN_TURNS])
                              for shares in (drops.get("share_by_turn", []), queue.get("queue_share_by_turn", [])))
    return {"overall": drops.get("overall"),
            "first_quarter": (drops.get("first_quarter") or {}).get("value"),
            "last_quarter": (drops.get("last_quarter") or {}).get("value"),
            "rise": rise, "queue_rise": (queue.get("queue_rise") or {}).get("value"), "excess": excess,
            "share_by_turn": by_turn, "queue_share_by_turn": queue_by_turn}


def _brief(estimate: dict | None) -> dict | None:
    return None if estimate is None else {k: estimate.get(k) for k in ("value", "ci_low", "ci_high")}


def _turn_gap(per_seed: list[dict], key: str) -> float | None:
    """Mean over seeds of (share in turns >= 2) - (share in turn 0), unweighted by turn: a description."""
    gaps = []
    for s in per_seed:
        by_turn = {int(k): v for k, v in s[key].items() if v is not None and np.isfinite(v)}
        late = [v for t, v in by_turn.items() if t >= 2]
        if 0 in by_turn and late:
            gaps.append(float(np.mean(late)) - by_turn[0])
    return float(np.mean(gaps)) if gaps else None


CLAIM = ("On multi-turn chat, tokens late in the sequence (later turns) lose more routed choices to full experts "
         "than early ones.")
PAPER_NUMBER = ("OpenMoE-8B on MT-Bench (read off the figure): 1-2% of choices dropped below position 750, 5-10% at "
                "750-1500, 15-33% beyond 1500; about 2-3% at every position on pretraining-like data.")
MEASURED = ("Rise of the dropped share of routed choices from the first to the last quarter of positions (the "
            "paper's raw late-position rise): null 0 (no rise). Interval: t over seeds. Details: per seed the rise "
            "the queue alone gives (each sequence's chosen sets shuffled across its positions and re-simulated at "
            "the trained capacity, batch and queue order) and its share of the raw rise.")
MIN_SEQ_LEN = 2048  # the paper's rise starts near position 750 and is largest beyond 1500
LONG_SEQ = MIN_SEQ_LEN  # the long-context runs' sequence length (OpenMoE's)


def long_batch(s) -> int:
    """Rows per step of a long run: the base runs' tokens per step in LONG_SEQ-token rows (at least one)."""
    return max(1, s.batch_size * s.seq_len // LONG_SEQ)


def long_run(ws: Workspace, seed: int) -> Path:
    """tiny-moe trained at LONG_SEQ tokens per sequence on the main corpus, at the scale's steps and tokens
    per step: the model the drop rows read (the base runs' contexts are too short for the paper's rise)."""
    s = ws.scale
    return ws.run(f"long-tiny-moe-s{seed}", "tiny-moe", overrides=[
        f"model.max_seq_len={LONG_SEQ}", f"data.seq_len={LONG_SEQ}", f"data.batch_size={long_batch(s)}"], seed=seed)


def long_trace(ws: Workspace, seed: int, name: str, corpus: Path | None = None) -> Path:
    """A long run's final checkpoint traced in LONG_SEQ-token rows at its trained capacity and batch."""
    return ws.trace(final(long_run(ws, seed)), name, corpus=corpus, seq_len=LONG_SEQ, batch_size=long_batch(ws.scale))
NOTE = ("Margin 0.02 (2 points of dropped share): the paper's figure rises by 4-30 points. "
        "Conversations are packed into rows, so a row's late positions are not a chat's late turns; the turn "
        "gap in details (turns >= 2 minus turn 0, no interval) describes turns directly. Part of this text (pydoc "
        "topics, the first stdlib files) is also in the main corpus the model was trained on.")


def describe_long(ws: Workspace) -> str:
    """The long runs, from seed 0's saved config (never typed by hand)."""
    from moelab.train.checkpoint import read_checkpoint_config

    s, run = ws.scale, long_run(ws, 0)
    cfg = read_checkpoint_config(final(run))
    moe, b = cfg["model"]["moe"], long_batch(s)
    active, total = param_counts(run)
    return (f"tiny-moe at {cfg['data']['seq_len']} tokens per sequence ({millions(active)} active of "
            f"{millions(total)}; top-{moe['top_k']} of {moe['num_experts']}, capacity factor "
            f"{moe['capacity_factor_train']} ({moe['capacity_formula']}, {moe['drop_policy']} queue) over each "
            f"batch of {b} x {LONG_SEQ} tokens), {s.steps} steps x {b} x {LONG_SEQ} tokens "
            f"({s.steps * b * LONG_SEQ:,} training tokens) per model on the main corpus")


def describe(ws: Workspace, num_docs: int, held: int, traced: int) -> str:
    return (f"{describe_long(ws)}, traced at the trained capacity on multi-turn text: "
            f"{num_docs} conversations built by data/turns.py from the interpreter sessions in the stdlib's "
            f"docstrings and pydoc's topics ('>>>' input turn, then the interpreter's reply turn; sessions "
            f"with >= 2 replies), tokenized with the main corpus's tokenizer, packed into {LONG_SEQ}-token "
            f"rows; {traced:,} tokens traced (of the {held:,} in the held-out {HELDOUT:.0%} of the conversations).")


def longest_row(traces: list[Path]) -> int:
    """The fewest positions any of the traces reaches (its longest row's length): what the rows measured."""
    from moelab.trace.io import open_trace

    longest = []
    for t in traces:
        top = -1
        for b in open_trace(t).iter_batches(columns=["pos"]):
            top = max(top, int(np.max(b["pos"])) if len(b["pos"]) else -1)
        longest.append(top + 1)
    return min(longest) if longest else 0


def reach(seq_len: int) -> Precondition:
    """The positions where OpenMoE's rise happens are inside the traced sequences."""
    return Precondition(f"sequences of >= {MIN_SEQ_LEN} tokens (the paper's rise starts near position 750)",
                        f"{seq_len}-token sequences", seq_len >= MIN_SEQ_LEN)


@row("openmoe-drop-towards-end", "OpenMoE")
def drop_towards_end(ws: Workspace) -> ClaimResult:
    from moelab.data.shards import load_corpus

    s, corpus = ws.scale, turns_corpus(ws)
    traces = [long_trace(ws, seed, f"turns-doctest-long-tiny-moe-s{seed}", corpus) for seed in range(s.seeds)]
    names = [f"seed{seed}" for seed in range(s.seeds)]
    # Final checkpoints of one preset share a step, so the report compares them (never a checkpoint series).
    metrics = ws.analyze("turns-drops-long-tiny-moe", traces, names=names, options={"analyses": ["drops"]})
    per_seed = [_per_seed(metrics["models"][n]) for n in names]
    rises = [float("nan") if p["rise"] is None or p["rise"]["value"] is None else float(p["rise"]["value"])
             for p in per_seed]
    for p, r in zip(per_seed, rises):
        p["queue_share_of_rise"] = (p["queue_rise"] / r) if p["queue_rise"] is not None and r else None
    c = load_corpus(corpus)
    held = c.info["splits"]["heldout"]["tokens"]
    traced = min(held, s.trace_tokens) if s.trace_tokens else held
    details = {"per_seed": per_seed, "turn_gap_observed": _turn_gap(per_seed, "share_by_turn"),
               "turn_gap_queue_only": _turn_gap(per_seed, "queue_share_by_turn"),
               "conversations": c.num_docs, "traced_tokens": traced}
    return ClaimResult(
        row="openmoe-drop-towards-end", paper="OpenMoE", claim=CLAIM, paper_number=PAPER_NUMBER, measured=MEASURED,
        measure=Measure(float(np.nanmean(rises)), float("nan"), float("nan"), 0.0), test=Claim("greater", margin=0.02),
        unit="", seed_values=rises, precondition=reach(longest_row(traces)),
        setup=describe(ws, c.num_docs, held, traced), seeds=s.seeds, details=details, note=NOTE)
