"""Code-size limits of the package (issue #17): no function over 80 lines, no class over 350."""

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "geta_hf")
MAX_FUNCTION, MAX_CLASS = 80, 350


def _definitions():
    for root, _, files in os.walk(PKG):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        yield os.path.relpath(path, PKG), node


def test_no_function_over_80_lines_and_no_class_over_350():
    too_long = []
    for path, node in _definitions():
        lines = node.end_lineno - node.lineno + 1
        limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
        if lines > limit:
            too_long.append(f"{path}:{node.lineno} {node.name} has {lines} lines (max {limit})")
    assert not too_long, "\n".join(too_long)
