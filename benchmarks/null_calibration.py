"""How often each specialisation null calls a planted "nothing" significant, and how often it finds a planted effect.

The traces are `synthetic.clustered_batch`: every sequence routes its tokens by its own topic, as a model
routes a document. In the "nothing" scenarios the routing ignores what is tested (a domain drawn at
random per sequence; the token ID in bursty text, each sequence drawing from its own 40 of 2,000 IDs), so
a calibrated one-sided test at level 5% rejects about 5% of runs. In the "effect" scenarios the routing
follows it, and the test should reject nearly always. Each run is tested twice: with analyze_all's nulls
(domain across documents, token ID within sequences) and with the token shuffle they replaced (the label
across single tokens, n(g) sets drawn from the layer's pool; MI: labels over the choices). 64 permutations,
so p >= 1/65. Interval: Wilson's 95% for a binomial rate.

The "past the pool" scenarios hold a pool of 2,048 of the trace's 8,192 tokens, as a real trace holds
2^18 of its millions: the token-ID nulls then test a hash sample of whole sequences (seqpool.py), where
they fell back to the token shuffle before (n(g) sets drawn from the same-sized pool).

    python benchmarks/null_calibration.py [--runs 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from moelab.analysis.resample import POOL_SIZE, SetPoolAccumulator
from moelab.analysis.seqpool import SequencePoolAccumulator
from moelab.analysis.specialization import domain_layer, expert_label_mi, std_layer, vocab_layer
from moelab.analysis.suite import analyze_all
from moelab.analysis.synthetic import clustered_batch
from moelab.analysis.tables import ShareAccumulator

E, K, PERMS, LEVEL = 8, 2, 64, 0.05
SCENARIOS = {  # name -> (clustered_batch options, the statistics it tests, whether an effect is planted)
    "random domain": (dict(token_sd=1.0), ("domain", "mi"), False),
    "domain effect": (dict(token_sd=1.0, domain_sd=1.0), ("domain", "mi"), True),
    "bursty text, IDs ignored": (dict(vocab=2000, ids_per_seq=40, noise_sd=0.8), ("vocab", "std"), False),
    "bursty text, ID effect": (dict(vocab=300, ids_per_seq=200, token_sd=1.5, noise_sd=0.8), ("vocab", "std"), True),
    "past the pool, IDs ignored": (dict(vocab=2000, ids_per_seq=40, noise_sd=0.8), ("vocab", "std"), False),
    "past the pool, ID effect": (dict(vocab=300, ids_per_seq=200, token_sd=1.5, noise_sd=0.8), ("vocab", "std"), True),
}
SMALL_POOL = 2048  # tokens a layer, in the "past the pool" scenarios


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def p_of(value: float, null: np.ndarray) -> float:
    return float((1 + np.sum(null >= value)) / (1 + len(null)))


def token_shuffle_p(batch: dict, stats: tuple[str, ...], seed: int, pool_size: int = POOL_SIZE) -> dict[str, float]:
    """The nulls analyze_all used before: labels across a layer's tokens (MI: over the choices)."""
    pool_acc = SetPoolAccumulator([E], K, seed=seed, size=pool_size)
    pool_acc.update(batch)
    pool, out = pool_acc.result(), {}
    if "domain" in stats:
        t = _tables(batch, "domain")
        part = domain_layer(t, 0, pool=pool, n_permutations=PERMS, null_seed=seed)
        out["domain"] = p_of(part["value"], part["null"])
        mi = expert_label_mi(_tables(batch, "domain", ranks="top1"), n_permutations=PERMS, seed=seed)
        out["mi"] = mi.overall.p
    if "vocab" in stats:
        t = _tables(batch, "token")
        part = vocab_layer(t, 0, min_count=5, pool=pool, n_permutations=PERMS, null_seed=seed)
        out["vocab"] = p_of((part["mean"] - K / E) / (1 - K / E), part["null"])
        part = std_layer(t, 0, min_count=5, pool=pool, n_permutations=PERMS, null_seed=seed)
        out["std"] = p_of(part["mean"], part["null"])
    return out


def _tables(batch: dict, group: str, ranks: str = "all"):
    acc = ShareAccumulator(group, [E], K, ranks=ranks, folds=1)
    acc.update(batch)
    return acc.result()


def suite_p(batch: dict, seed: int) -> dict[str, float]:
    r = analyze_all([batch], num_experts=[E], top_k=K, analyses=("specialisation",), labels=("domain",),
                    min_count=5, vocab_min_count=5, n_permutations=PERMS, n_bootstrap=0, seed=seed)
    return {"domain": r["domain_specialisation:domain"].overall.p, "mi": r["mi:domain"].overall.p,
            "vocab": r["vocab"].overall.p, "std": r["std_token"].overall.p}


def sample_test_p(batch: dict, seed: int, pool_size: int, excess: dict | None = None) -> dict[str, float]:
    """analyze_all's token-ID nulls where the pool holds a hash sample of the sequences: its own parts
    (vocab_layer, std_layer) over a `pool_size` SequencePool, as the suite calls them. `excess` collects
    each statistic's value less its null mean: the sample's, and the exact test's (the whole trace pooled)."""
    t, out = _tables(batch, "token"), {}
    for size in (pool_size, POOL_SIZE):
        acc = SequencePoolAccumulator([E], K, size=size, seed=seed)
        acc.update(batch)
        pool = acc.result()
        assert pool.within_sequence(0) == (size == POOL_SIZE)
        part = vocab_layer(t, 0, min_count=5, pool=pool, n_permutations=PERMS, null_seed=seed)
        std = std_layer(t, 0, min_count=5, pool=pool, n_permutations=PERMS, null_seed=seed)
        values = {"vocab": ((part["mean"] - K / E) / (1 - K / E), part["null"]), "std": (std["mean"], std["null"])}
        for name, (value, null) in values.items():
            if size == pool_size:
                out[name] = p_of(value, null)
            if excess is not None:
                excess.setdefault((name, size == pool_size), []).append(value - float(np.mean(null)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="independent traces per scenario (%(default)s)")
    ap.add_argument("--json", default=None, help="write the rows here as JSON")
    args = ap.parse_args(argv)
    if args.runs < 1:
        print("null_calibration: --runs must be at least 1", file=sys.stderr)
        return 2
    rows, shrink, t0 = [], [], time.perf_counter()
    for name, (opts, stats, effect) in SCENARIOS.items():
        excess: dict = {}
        p_new = {s: [] for s in stats}
        p_old = {s: [] for s in stats}
        for run in range(args.runs):
            batch = clustered_batch(1000 * run + 7, num_experts=E, top_k=K, **opts)
            if name.startswith("past the pool"):
                new = sample_test_p(batch, run, SMALL_POOL, excess if effect else None)
                old = token_shuffle_p(batch, stats, run, SMALL_POOL)
            else:
                new, old = suite_p(batch, run), token_shuffle_p(batch, stats, run)
            for s in stats:
                p_new[s].append(new[s])
                p_old[s].append(old[s])
        for s in stats:
            if (s, True) in excess:
                shrink.append(dict(scenario=name, statistic=s, sample=float(np.mean(excess[s, True])),
                                   whole=float(np.mean(excess[s, False])), runs=args.runs))
            for which, ps in (("analyze_all (sequences / documents kept whole)", p_new[s]),
                              ("token shuffle (before)", p_old[s])):
                k = int(np.sum(np.asarray(ps) <= LEVEL))
                lo, hi = wilson(k, args.runs)
                rows.append(dict(scenario=name, effect=effect, statistic=s, null=which, rejected=k, runs=args.runs,
                                 rate=k / args.runs, ci_low=lo, ci_high=hi))
    print("| scenario | statistic | null | rejected at 5% | rate [95% Wilson] |")
    print("|---|---|---|---:|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['statistic']} | {r['null']} | {r['rejected']} / {r['runs']} | "
              f"{r['rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |")
    print("\n| scenario | statistic | mean excess over the null: sample test | exact test (whole trace) | ratio |")
    print("|---|---|---:|---:|---:|")
    for r in shrink:
        print(f"| {r['scenario']} | {r['statistic']} | {r['sample']:.4f} | {r['whole']:.4f} | "
              f"{r['sample'] / r['whole']:.2f} |")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rates": rows, "excess": shrink}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
