"""The reference is the docstrings: every public name documents itself (help() answers a
user without the web), each docstring names its parameters, and docs/api.md gives every
public method of MpopApi and Executor, mpop.attach, and mpop.joblib's names a heading
with the signature the code has."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import mpop
import mpop.joblib
from mpop._futures import MpopFuture

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"

# Methods concurrent.futures.Executor provides (documented there, not here).
INHERITED = {"__init_subclass__", "__subclasshook__"}


def _public_members(cls: type) -> dict:
    """Methods and properties a class defines itself, public or the protocol ones."""
    out = {}
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__enter__", "__exit__", "__call__"):
            continue
        if isinstance(value, property):
            out[name] = value.fget
        elif isinstance(value, (staticmethod, classmethod)):
            out[name] = value.__func__
        elif callable(value):
            out[name] = value
    return out


def _public_objects() -> list[tuple[str, object]]:
    objs = []
    for name in mpop.__all__:
        if name == "__version__":
            continue
        obj = getattr(mpop, name)
        objs.append((name, obj))
        if inspect.isclass(obj) and obj.__module__.startswith("mpop"):
            for m, f in _public_members(obj).items():
                if m != "__init__":
                    objs.append((f"{name}.{m}", f))
    objs += [(f"MpopFuture.{m}", f) for m, f in _public_members(MpopFuture).items() if m != "__init__"]
    objs.append(("MpopFuture.__await__", MpopFuture.__await__))
    for name in mpop.joblib.__all__:
        obj = getattr(mpop.joblib, name)
        objs.append((f"mpop.joblib.{name}", obj))
        if inspect.isclass(obj):
            objs += [(f"mpop.joblib.{name}.{m}", f) for m, f in _public_members(obj).items() if m != "__init__"]
    return objs


@pytest.mark.parametrize(("name", "obj"), _public_objects(), ids=[n for n, _ in _public_objects()])
def test_every_public_name_has_a_docstring(name, obj):
    assert (inspect.getdoc(obj) or "").strip(), f"{name} has no docstring"


def _documented_parameters(fn) -> list[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [p for p in sig.parameters if p not in ("self", "cls")]


@pytest.mark.parametrize("cls", [mpop.MpopApi, mpop.Executor])
def test_docstrings_name_every_parameter(cls):
    missing = []
    for name, fn in [("__init__", cls.__init__), *_public_members(cls).items()]:
        if name == "__init__" and cls.__init__ is object.__init__:
            continue
        doc = inspect.getdoc(cls if name == "__init__" else fn) or ""
        for p in _documented_parameters(fn):
            if p in ("args", "kwargs", "exc", "fn") and name != "__init__":
                continue  # *args/**kwargs and the callable are the call itself
            if not re.search(rf"\b{re.escape(p)}\b", doc):
                missing.append(f"{cls.__name__}.{name}: {p}")
    assert not missing, "\n".join(missing)


def _api_md_signatures() -> dict[str, str]:
    """Qualified name -> the parameter list of each `#### \\`name(...)` heading of docs/api.md.

    A heading is qualified by the `## \\`Class\\`` section it stands in (``MpopApi.submit``,
    ``Executor.submit``); one that names its module (``mpop.attach``) keeps that name."""
    out = {}
    section = ""
    for line in API_MD.read_text().splitlines():
        top = re.match(r"^## `(\w+)`", line)
        if top:
            section = top.group(1)
            continue
        if line.startswith("## "):
            section = ""
            continue
        m = re.match(r"^#### `((?:mpop\.(?:\w+\.)?)?\w+)\((.*?)\)(?: -> [^`]*)?`", line)
        if m:
            name = m.group(1)
            out[name if name.startswith("mpop.") else f"{section}.{name}"] = m.group(2)
    return out


def _render(sig: inspect.Signature) -> str:
    """A signature as docs/api.md writes it: no annotations, no self."""
    params = []
    star_done = False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text, star_done = "*" + p.name, True
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + p.name
        elif p.kind is p.KEYWORD_ONLY and not star_done:
            params.append("*")
            star_done = True
        if p.default is not p.empty:
            text += "=" + repr(p.default)
        params.append(text)
    positional_only = [p for p in sig.parameters.values() if p.kind is p.POSITIONAL_ONLY and p.name != "self"]
    if positional_only:
        params.insert(len(positional_only), "/")
    return ", ".join(params)


def _signature_problems(cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    """How docs/api.md's headings for `cls`'s public methods differ from the code."""
    documented = _api_md_signatures()
    problems = []
    for name, fn in _public_members(cls).items():
        if name.startswith("_") or isinstance(vars(cls).get(name), property) or name in skip:
            continue
        want = _render(inspect.signature(fn))
        key = f"{cls.__name__}.{name}"
        if key not in documented:
            problems.append(f"docs/api.md has no heading for {key}({want}) under ## `{cls.__name__}`")
        elif documented[key] != want:
            problems.append(f"{key}: docs/api.md says ({documented[key]}), the code ({want})")
    return problems


def test_api_md_gives_every_mpop_api_method_with_its_signature():
    problems = _signature_problems(mpop.MpopApi, skip=("close",))  # close: an alias of shutdown
    assert not problems, "\n".join(problems)


def test_api_md_gives_every_executor_method_with_its_signature():
    assert {"submit", "map", "shutdown"} <= set(_public_members(mpop.Executor))
    problems = _signature_problems(mpop.Executor)
    assert not problems, "\n".join(problems)


def test_api_md_gives_attach_with_its_signature():
    documented = _api_md_signatures()
    want = _render(inspect.signature(mpop.attach))
    assert "mpop.attach" in documented, f"docs/api.md has no heading for mpop.attach({want})"
    assert documented["mpop.attach"] == want, \
        f"mpop.attach: docs/api.md says ({documented['mpop.attach']}), the code ({want})"


@pytest.mark.parametrize("name", mpop.joblib.__all__)
def test_api_md_gives_mpop_joblib_with_its_signatures(name):
    documented = _api_md_signatures()
    obj = getattr(mpop.joblib, name)
    want = _render(inspect.signature(obj))
    key = f"mpop.joblib.{name}"
    assert key in documented, f"docs/api.md has no heading for {key}({want})"
    assert documented[key] == want, f"{key}: docs/api.md says ({documented[key]}), the code ({want})"


def test_api_md_lists_mpop_joblib_all_as_it_is():
    m = re.search(r"mpop\.joblib\.__all__ = (\[.*?\])", API_MD.read_text(), re.S)
    assert m, "docs/api.md does not show mpop.joblib.__all__"
    assert ast.literal_eval(m.group(1)) == list(mpop.joblib.__all__)


def test_api_md_lists_mpop_all_as_it_is():
    text = API_MD.read_text()
    m = re.search(r"mpop\.__all__ = (\[.*?\])", text, re.S)
    assert m, "docs/api.md does not show mpop.__all__"
    assert ast.literal_eval(m.group(1)) == list(mpop.__all__)


# -- mpop.dask, a submodule (the `dask` extra) ---------------------------------------------------


def _dask_objects() -> list[tuple[str, object]]:
    dask_mod = pytest.importorskip("mpop.dask")
    objs = []
    for name in dask_mod.__all__:
        obj = getattr(dask_mod, name)
        objs.append((f"mpop.dask.{name}", obj))
        objs += [(f"mpop.dask.{name}.{m}", f) for m, f in _public_members(obj).items() if m != "__init__"]
    return objs


def test_every_public_name_of_mpop_dask_has_a_docstring():
    missing = [name for name, obj in _dask_objects() if not (inspect.getdoc(obj) or "").strip()]
    assert not missing, f"no docstring: {missing}"


def test_dask_pool_docstrings_name_every_parameter():
    dask_mod = pytest.importorskip("mpop.dask")
    test_docstrings_name_every_parameter(dask_mod.DaskPool)


def test_api_md_gives_every_dask_pool_method_with_its_signature():
    dask_mod = pytest.importorskip("mpop.dask")
    assert {"map", "submit", "close"} <= set(_public_members(dask_mod.DaskPool))
    problems = _signature_problems(dask_mod.DaskPool)
    assert not problems, "\n".join(problems)
