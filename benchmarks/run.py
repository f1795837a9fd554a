"""Run every speed benchmark (`bench_*.py`) and write the results table into docs/PERFORMANCE.md.

Each benchmark runs in its own process with the same GLIBC_TUNABLES (see bench_common.py), so no run
inherits another's heap, and a crash loses one row group, not the table. The table replaces the part of
docs/PERFORMANCE.md between the `results` markers; the hand-written analysis around it stays. Targets are
read from the table, never asserted: this exits non-zero only when a benchmark crashed.

    python benchmarks/run.py [--only moe-layer,train] [--reps 5] [--out docs/PERFORMANCE.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from bench_common import GLIBC_TUNABLES  # noqa: E402

# (key, script, args, also on CUDA). Layer and HF cases run one per process to stay in the time budget.
BENCHES = [
    ("moe-layer:e8", "bench_moe_layer.py", ["--case", "e8"], True),
    ("moe-layer:e64", "bench_moe_layer.py", ["--case", "e64"], True),
    ("moe-layer:e16-drop", "bench_moe_layer.py", ["--case", "e16-drop"], True),
    ("moe-layer:decode", "bench_moe_layer.py", ["--case", "decode"], True),
    ("hf:mixtral", "bench_hf_moe.py", ["--case", "mixtral"], True),
    ("hf:mixtral-256", "bench_hf_moe.py", ["--case", "mixtral-256"], True),
    ("hf:qwen2-moe", "bench_hf_moe.py", ["--case", "qwen2-moe"], True),
    ("train", "bench_train_step.py", [], True),
    ("trace", "bench_trace.py", [], False),
    ("trace-read", "bench_trace_read.py", [], False),
    ("hf-trace", "bench_hf_trace.py", [], False),
    ("analysis", "bench_analysis.py", [], False),
    ("generate", "bench_generate.py", [], True),
]
BEGIN, END = "<!-- results:begin (written by benchmarks/run.py) -->", "<!-- results:end -->"


def machine() -> dict[str, str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": f"{cpu}, {os.cpu_count()} logical cores", "python": platform.python_version(),
            "torch": torch.__version__, "os": platform.platform()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return info


def run_one(script: str, args: list[str], device: str, reps: int | None) -> tuple[list[dict], float, str]:
    """(rows, wall seconds, error text or "") of one benchmark process."""
    env = {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(HERE / script), *args, "--device", device, "--json", str(out)]
        if reps is not None:
            cmd += ["--reps", str(reps)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        print(done.stdout, end="", flush=True)
        if done.returncode != 0 or not out.exists():
            err = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(done.stderr, file=sys.stderr)
            return [], wall, f"{script} {' '.join(args)} failed: {err}"
        return json.loads(out.read_text()), wall, ""


def status(row: dict) -> str:
    t = row["target"]
    if t is None:
        return "-"
    if row["ratio"] <= t:
        return "met"
    return f"**missed by {100 * (row['ratio'] / t - 1):.0f}%**"


def fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.1f} s" if v >= 10 else f"{v * 1e3:,.1f} ms"
    return f"{v:.2f} {unit}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| benchmark | case | A | B | A | B | A / B | target | status | note |",
             "|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        dev = r["extra"].get("device", "cpu")
        group = r["group"] if dev == "cpu" else f"{r['group']} ({dev})"
        target = f"<= {r['target']:.2f}" if r["target"] is not None else "-"
        unit = r.get("unit", "s")
        lines.append(f"| {group} | {r['name']} | {r['a']} | {r['b']} | {fmt(r['a_s'], unit)} | "
                     f"{fmt(r['b_s'], unit)} | {r['ratio']:.3f} | {target} | {status(r)} | {r['note']} |")
    return lines


def results_block(rows: list[dict], walls: dict[str, float], errors: list[str], info: dict) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    out = [BEGIN, "", f"Measured {when} by `python benchmarks/run.py`.", ""]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += [f"- load average after the run (1/5/15 min): {load}",
            f"- every benchmark process ran with `GLIBC_TUNABLES={GLIBC_TUNABLES}`", ""]
    out += table(rows)
    out += ["", "Wall time of each benchmark process: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) + "."]
    if errors:
        out += ["", "Crashed:", *[f"- {e}" for e in errors]]
    return "\n".join(out + ["", END])


def write_doc(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated key prefixes, e.g. moe-layer,hf (default: all)")
    ap.add_argument("--reps", type=int, help="timed runs per variant (default: each benchmark's own)")
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "PERFORMANCE.md"))
    args = ap.parse_args()
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    wanted = args.only.split(",") if args.only else None
    rows, walls, errors = [], {}, []
    for key, script, bargs, on_cuda in BENCHES:
        if wanted and not any(key.startswith(w) for w in wanted):
            continue
        for dev in devices if on_cuda else ["cpu"]:
            got, wall, err = run_one(script, bargs, dev, args.reps)
            rows += got
            walls[key if dev == "cpu" else f"{key} ({dev})"] = wall
            if err:
                errors.append(err)
    write_doc(Path(args.out), results_block(rows, walls, errors, machine()))
    print(f"wrote {args.out}" + (f"; {len(errors)} benchmark(s) crashed" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
