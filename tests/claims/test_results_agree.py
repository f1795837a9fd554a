"""docs/RESULTS.md's headline claims must say what the claims table decides from docs/claims/."""

import re
from pathlib import Path

from moelab.claims.record import read_results
from moelab.claims.seeds import t_interval

ROOT = Path(__file__).resolve().parents[2]


def test_results_headlines_agree_with_the_claims_results():
    text = " ".join((ROOT / "docs" / "RESULTS.md").read_text().split())
    results = read_results(ROOT / "docs" / "claims")
    dense = results["openmoe-moe-beats-dense"]
    worse = sum(s["moe"] > s["dense"] for s in dense.details["per_seed"])
    assert "every MoE variant beats the dense model" not in text
    m = re.search(r"the MoE is worse than dense on (\d) of (\d) seeds and the verdict is \*\*([a-z ]+)\*\*", text)
    assert m, "RESULTS.md lost its sentence on openmoe-moe-beats-dense"
    assert (int(m[1]), int(m[2]), m[3]) == (worse, len(dense.details["per_seed"]), dense.verdict)
    gaps = [s["dense"] - s["moe"] for s in dense.details["per_seed"]]
    mean, lo, hi = t_interval(gaps)  # the numbers quoted are the table's own
    assert f"{mean:+.4f} nats, t-interval over seeds [{lo:.3f}, {hi:.3f}]" in text
    linear = results["rmoe-beats-linear"]
    assert f"rmoe-beats-linear: **{linear.verdict}**, {len(linear.seed_values)} seeds" in text
    mean, lo, hi = t_interval(linear.seed_values)
    assert f"linear minus GRU {mean:.2f} nats, t-interval over seeds [{lo:.3f}, {hi:.3f}]" in text
    # Every "claims row NAME: **VERDICT**" in RESULTS.md says the table's verdict.
    quoted = re.findall(r"claims row ([a-z0-9-]+): \*\*([a-z ]+)\*\*", text)
    assert {"rmoe-beats-linear", "openmoe-drop-towards-end", "rmoe-cross-layer-mi"} <= {r for r, _ in quoted}
    assert all(results[r].verdict == v for r, v in quoted), [(r, v, results[r].verdict) for r, v in quoted]
