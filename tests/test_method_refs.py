"""Every "method §N" reference in the package resolves to a heading of docs/method.md (#17)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _headings():
    with open(os.path.join(ROOT, "docs", "method.md"), encoding="utf-8") as f:
        return {m.group(1) for m in (re.match(r"#+\s+(\d+(?:\.\d+)*)\.?\s", line) for line in f)
                if m}


def _references():
    for root, _, files in os.walk(os.path.join(ROOT, "geta_hf")):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        for m in re.finditer(r"§\s*(\d+(?:\.\d+)*)", line):
                            yield m.group(1).rstrip("."), f"{os.path.relpath(path, ROOT)}:{i}"


def test_every_section_reference_resolves_to_a_heading():
    heads = _headings()
    refs = list(_references())
    assert refs, "no § references found: the pattern is wrong"
    missing = [f"§{ref} at {where}" for ref, where in refs if ref not in heads]
    assert not missing, "no such heading in docs/method.md: " + "; ".join(missing)


def test_public_names_have_docstrings():
    import inspect

    import geta_hf
    from geta_hf import registry

    undocumented = []
    for module in (geta_hf, registry):
        for name in module.__all__:
            obj = getattr(module, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj):
                undocumented.append(f"{module.__name__}.{name}")
    assert not undocumented, undocumented
