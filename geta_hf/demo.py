"""Deprecated name of :mod:`geta_hf.examples.demo` (kept for one release)."""

from ._moved import alias_module

alias_module(__name__, "geta_hf.examples.demo")
