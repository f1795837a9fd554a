"""The 10-million-row trace analysis (`benchmarks/analysis_scale.py`, run as is in a subprocess), read into
rows against its budgets: `analyze_all` under 60 s and the process's peak RSS under 2 GiB.

analysis_scale.py times with the wall clock (it is one long pass whose Parquet reads may use threads) and
reports the peak RSS of its own process, writing the synthetic trace included.

    python benchmarks/bench_analysis.py [--json rows.json]
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

SCRIPT = Path(__file__).with_name("analysis_scale.py")
TARGET_S, TARGET_GIB = 60.0, 2.0


def main() -> None:
    args = bc.parse_args(__doc__.splitlines()[0])
    bc.check_env()
    # The subprocess inherits this process's environment, GLIBC_TUNABLES included.
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True)
    print(done.stdout, end="")
    rows_n = re.search(r"^rows ([\d,]+)", done.stdout, re.M).group(1)
    write_s = float(re.search(r"^write\s+([\d.]+) s", done.stdout, re.M).group(1))
    analyse_s = float(re.search(r"^analyse\s+([\d.]+) s", done.stdout, re.M).group(1))
    peak = float(re.search(r"^peak RSS ([\d.]+) GiB", done.stdout, re.M).group(1))
    name = f"analyze_all over a synthetic {rows_n}-row trace"
    rows = [
        bc.Row("analysis", f"{name}: time", "analysis", "budget", analyse_s, TARGET_S, analyse_s / TARGET_S,
               1.0, note=f"wall clock; writing the trace took {write_s:.1f} s more"),
        bc.Row("analysis", f"{name}: peak RSS", "peak RSS", "budget", peak, TARGET_GIB, peak / TARGET_GIB,
               1.0, note="whole process, writing included", unit="GiB"),
    ]
    bc.emit(rows, args.json)


if __name__ == "__main__":
    main()
