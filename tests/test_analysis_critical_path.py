"""benchmarks/analysis_critical_path.py: its schedule by hand, and a run at toy size so it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from analysis_critical_path import estimate, pool_seconds  # noqa: E402


def test_the_pool_hands_jobs_out_in_order_to_the_first_free_worker():
    def jobs(*runs):
        return [(r, 0.0) for r in runs]

    assert pool_seconds(jobs(3, 1, 1, 1), 2, 0.0) == 3  # 3 | 1 1 1
    assert pool_seconds(jobs(1, 1, 3), 2, 0.0) == 4  # 1 then 3 | 1: in order, not longest first
    assert pool_seconds(jobs(2, 2, 2), 8, 0.0) == 2 and pool_seconds([], 4, 1.0) == 0
    assert pool_seconds(jobs(1, 2, 3), 1, 0.0) == 6


def test_the_pool_forks_as_it_goes_and_reads_results_back_one_by_one():
    # fork (1), a runs to 4; fork (2), b runs to 3; b read back 3 -> 3.5; a read back 4 -> 4.5
    assert pool_seconds([(3.0, 0.5), (1.0, 0.5)], 2, 1.0) == 4.5
    # short jobs: the first worker is free again before a third fork would start, so it takes job 3:
    # forks end at 1, 2 and 3 (not four), the last job runs 3 -> 3.1
    assert abs(pool_seconds([(0.1, 0.0)] * 4, 8, 1.0) - 3.1) < 1e-12


def test_estimate_merges_each_part_when_ready_then_adds_the_rounds_and_the_parent():
    pieces = {"parts_s": [1.0, 3.0], "merge_parts_s": [0.2, 0.3], "stream_fork_s": 0.1,
              "rounds": [[("a", 2.0, 0.1), ("b", 1.0, 0.1)]], "fork_s": [0.2], "parent_finalise_s": 0.3,
              "stream_s": 4.0}
    est = estimate(pieces, 2)
    # part 0 ready at 0.1 + 1.0, merged to 1.3; part 1 ready at 0.2 + 3.0, merged to 3.5
    # the round: fork to 0.2 (a to 2.2), fork to 0.4 (b to 1.4), b read back to 1.5, a read back to 2.3
    assert abs(est["stream_s"] - 3.5) < 1e-9 and abs(est["estimate_s"] - (3.5 + 2.3 + 0.3)) < 1e-9
    assert est["largest_job_s"] == 2.0 and est["rounds_s"] == [2.3] and est["merge_s"] == 0.5
    # merges slower than the parts arrive: they queue behind each other
    slow = dict(pieces, parts_s=[1.0, 1.0], merge_parts_s=[2.0, 2.0])
    assert abs(estimate(slow, 2)["stream_s"] - (1.1 + 2.0 + 2.0)) < 1e-9


def test_a_toy_run_estimates_and_checks_two_workers(tmp_path):
    trace = tmp_path / "t.parquet"
    bench = ROOT / "benchmarks"
    write = [sys.executable, str(bench / "analysis_scale.py"), "--rows", "65536", "--layers", "2", "--experts", "8",
             "--top-k", "2", "--seq-len", "64", "--seqs-per-batch", "8", "--keep", str(trace), "--write-only"]
    assert subprocess.run(write, capture_output=True, text=True, timeout=300).returncode == 0
    done = subprocess.run([sys.executable, str(bench / "analysis_critical_path.py"), str(trace), "--workers", "3",
                           "--check", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    for n in (3, 2):
        est = rows[f"{n} workers, estimate"]
        assert est["estimate_s"] > 0 and est["merge_s"] >= 0 and len(est["rounds_s"]) == 2
    assert rows["1 worker, measured (s)"] > 0 and rows["2 workers, measured (s)"] > 0
