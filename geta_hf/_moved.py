"""Deprecated import names of modules that moved (kept for one release)."""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType
from typing import Sequence


def alias_module(old: str, new: str, submodules: Sequence[str] = ()) -> ModuleType:
    """Make ``import <old>`` (and ``import <old>.<sub>``) give the module ``new``, with a
    ``DeprecationWarning``. Called from the old module's body: the import system returns the
    ``sys.modules`` entry it leaves behind, so there is one module object under both names."""
    warnings.warn(f"{old} moved to {new}; the old name will be removed in the next release",
                  DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    for sub in submodules:
        sys.modules[f"{old}.{sub}"] = importlib.import_module(f"{new}.{sub}")
    sys.modules[old] = module
    return module
