import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def vectors():
    path = SHARED / "reference" / "vectors.json"
    if not path.is_file():
        pytest.skip(f"reference vectors not found at {path}")
    return json.loads(path.read_text())


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
