"""Deprecated name of :mod:`geta_hf.examples.data` (kept for one release)."""

from .._moved import alias_module

alias_module(__name__, "geta_hf.examples.data", ("qa", "synthetic_squad"))
