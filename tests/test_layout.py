"""How the package is put together: MpopApi stays a facade, and no part reaches into
another object's private attributes (each part talks to the others through what they
offer publicly, so that one can change without breaking another)."""

from __future__ import annotations

import ast
from pathlib import Path

import mpop

PACKAGE = Path(mpop.__file__).parent
# Private names of the standard library and of ctypes that the package may use.
ALLOWED = {"_base", "_type_", "_length_", "_exit", "_pool", "_invoke_callbacks"}


def _modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def test_no_part_reads_another_objects_private_attributes():
    offenders = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") or node.attr in ALLOWED:
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue
            if isinstance(base, ast.Name) and base.id in ("_core", "sys", "os", "mpop"):
                continue  # a module's private member (mpop._core is the package's own)
            offenders.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, "\n".join(offenders)


def test_mpop_api_is_a_facade():
    tree = ast.parse((PACKAGE / "_api.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MpopApi")
    # Its code, not its documentation: lines of the class less its docstrings and blanks.
    source = (PACKAGE / "_api.py").read_text().splitlines()[cls.lineno - 1:cls.end_lineno]
    doc_lines = set()
    for node in [cls, *cls.body]:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
            doc = node.body[0]
            doc_lines.update(range(doc.lineno, doc.end_lineno + 1))
    code = [line for i, line in enumerate(source, cls.lineno)
            if i not in doc_lines and line.strip() and not line.strip().startswith("#")]
    assert len(code) <= 220, f"MpopApi grew beyond a facade: {len(code)} lines of code"
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef):
            body = fn.body[1:] if ast.get_docstring(fn) else fn.body
            lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            assert lines <= 40, f"MpopApi.{fn.name} has {lines} lines of code"
