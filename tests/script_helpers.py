"""Import the scripts of experiments/ the way they import each other (their folder on
sys.path for the import only)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def experiment_scripts(*names: str) -> tuple[ModuleType, ...]:
    """``experiments/<name>.py`` for each name, imported as modules."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        return tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(EXPERIMENTS))
