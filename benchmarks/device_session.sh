#!/usr/bin/env bash
# What a session with a lent GPU machine owes issues 20 and 22, as two prepared device calls, one after the
# other on the warm machine (docs/PERFORMANCE.md, "A GPU session"):
#
#   bash benchmarks/device_session.sh gpu       # gpu_check.py: every CUDA row (budget 6 min, then the JSON)
#   bash benchmarks/device_session.sh workers   # the analysis at 1 and at every core on a real-shape trace
#
# Ask the device tool for kind nvidia-h200 (the issues' targets are an H200's; its default is now an H100).
# Results go under $OUT (the device tool's folder), else ./device-out. --tiny after the part runs the same
# part at toy sizes on the CPU (the test suite's smoke); further arguments go to gpu_check.py.
#
# `workers`: a synthetic trace of OLMoE-1B-7B's routing shape (16 layers, top-8 of 64, sequences of 2048),
# 262,144 tokens = 33,554,432 rows, the size of the trace issue 22 measured; written 4 sequences a batch, so
# the writer cuts 32 row groups of 1M rows and the drop re-simulation's capacity batches (4 sequences) never
# span two, and the workers have 32 units to share. Then the report's analysis (every analysis, nulls,
# intervals, a re-simulation and the queue baseline) at 1 worker and at `nproc` workers, each in a fresh
# process, one after the other. About 30 s to write and 1-1.5 minutes for the 1-worker analysis on
# a 2-core machine (measured); the 16-worker run should take seconds (estimated). Then the host side of
# tracing (bench_trace_host.py, OLMoE-1B-7B's shape, 1, 2 and 4 encoders: 87 s on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:-}
tiny=
[ $# -gt 0 ] && shift
if [ "${1:-}" = --tiny ]; then tiny=--tiny; shift; fi
if [ "$part" != gpu ] && [ "$part" != workers ]; then
    echo "device_session.sh: say which part: gpu or workers (then --tiny for the CPU smoke)" >&2
    exit 2
fi
out=${OUT:-device-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{ date -u '+%Y-%m-%d %H:%M UTC'; nproc; grep -m1 'model name' /proc/cpuinfo || true
  python -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'
  # the analysis workers hand their parts over through /dev/shm, or their pipes where it is missing or small
  echo "/dev/shm: $(df -h /dev/shm 2>/dev/null | tail -1 || echo missing)"
  # a trace encodes row groups on several threads only where pyarrow (>= 18) allows joining them
  python -c 'import pyarrow; from moelab.trace.stitch import joinable; print("pyarrow", pyarrow.__version__, "joinable", joinable())'
  # inductor on CUDA builds Triton's launcher with the C compiler and Python's headers on first use
  echo "cc: $(cc --version 2>/dev/null | head -1 || echo missing)"
  python -c 'import os, sysconfig; h = os.path.join(sysconfig.get_paths()["include"], "Python.h"); print("Python.h:", h if os.path.exists(h) else "missing")'
} > "$out/machine.txt"

case "$part" in
gpu)
    if [ "$tiny" = --tiny ]; then device=(--device cpu --tiny); else device=(--device cuda); fi
    # Stopped before the device's 600 s a call: the JSON is saved after every check, so what finished stays.
    timeout --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-560}" \
        python benchmarks/gpu_check.py "${device[@]}" --json "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
    ;;
workers)
    if [ "$tiny" = --tiny ]; then
        shape=(--rows 65536 --layers 2 --experts 8 --top-k 2 --seq-len 256); counts=1,2
    else
        shape=(--rows 33554432 --layers 16 --experts 64 --top-k 8 --seq-len 2048); counts=1,$(nproc)
    fi
    trace=$(mktemp -d)/trace.parquet
    python benchmarks/analysis_scale.py "${shape[@]}" --no-probs --seqs-per-batch 4 --keep "$trace" --write-only \
        2>&1 | tee "$out/workers.log"
    python benchmarks/analysis_scale.py --keep "$trace" --batch-seqs 4 --workers "$counts" \
        2>&1 | tee -a "$out/workers.log"
    rm -rf "$(dirname "$trace")"
    # The host side of tracing on this machine's cores: the ceiling it puts on trace / forward (issue 22)
    python benchmarks/bench_trace_host.py ${tiny:+--tiny} --encoders 1,2,4 --batches 8 --rounds 2 --json "$out/trace_host.json" 2>&1 | tee "$out/trace_host.log"
    ;;
esac
