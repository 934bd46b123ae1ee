"""Deprecated name of :mod:`geta_hf.examples.tasks` (kept for one release)."""

from .._moved import alias_module

alias_module(__name__, "geta_hf.examples.tasks", ("qa", "qa_trainer"))
