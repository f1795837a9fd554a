"""benchmarks/claims.py loaded as a module, for the tests that drive the claims runner's CLI."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def runner():
    spec = importlib.util.spec_from_file_location("claims_runner", ROOT / "benchmarks" / "claims.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
