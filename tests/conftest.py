"""Shared test settings: local data only, no network, no telemetry.

The README's test command sets FEDPRUNE_DATA_ROOT; running plain `pytest` from a checkout
with ../shared/data beside it also works (the same folder the README points at).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
if "FEDPRUNE_DATA_ROOT" not in os.environ and (REPO.parent / "shared" / "data").is_dir():
    os.environ["FEDPRUNE_DATA_ROOT"] = str(REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = os.environ.get("FEDPRUNE_DATA_ROOT")
    if not root or not Path(root).is_dir():
        pytest.fail("FEDPRUNE_DATA_ROOT must point at the shared data folder "
                    "(see README: the test command sets it)")
    return Path(root)
