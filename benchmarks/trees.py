"""Importing flowseg from a given source tree, for the benchmarks that compare two trees in one process."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType


def import_flowseg(tree: Path, *modules: str) -> tuple[ModuleType, ...]:
    """flowseg.<module> for each name, from `tree`, with every module of a previously imported copy forgotten."""
    for name in [name for name in sys.modules if name == "flowseg" or name.startswith("flowseg.")]:
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    try:
        package = importlib.import_module("flowseg")
        if Path(package.__file__).resolve().parent != (tree / "flowseg").resolve():
            raise RuntimeError(f"imported flowseg from {package.__file__}, not from {tree}")
        return tuple(importlib.import_module(f"flowseg.{module}") for module in modules)
    finally:
        sys.path.remove(str(tree))
