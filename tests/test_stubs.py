"""The type stubs of the native module (``zstream/_core.pyi``) against the module itself: every function, class,
method, property and constant the bindings define is in the stubs with the same parameters (names, kinds,
defaults), and the stubs promise nothing the bindings lack. The signatures live in the Rust ``#[pyo3(signature)]``
attributes; this test keeps the stubs from drifting."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

import zstream
from zstream import _core

STUBS = Path(zstream.__file__).with_name("_core.pyi")
Param = Tuple[str, str, Any]  # (name, kind, default: a literal, "<none>" without one, "<any>" when not checkable)


def _stub_params(fn: ast.FunctionDef) -> List[Param]:
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults: List[Any] = ["<none>"] * (len(positional) - len(a.defaults)) + [_literal(d) for d in a.defaults]
    out = [(p.arg, "positional", d) for p, d in zip(positional, defaults)]
    out += [(p.arg, "keyword", "<none>" if d is None else _literal(d)) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    return [p for p in out if p[0] != "self"]


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return "<any>"


def _runtime_params(obj: Any) -> List[Param]:
    out = []
    for p in inspect.signature(obj).parameters.values():
        if p.name == "self":
            continue
        kind = "keyword" if p.kind is p.KEYWORD_ONLY else "positional"
        default = "<none>" if p.default is p.empty else ("<any>" if p.default is Ellipsis else p.default)
        out.append((p.name, kind, default))
    return out


def _same(stub: List[Param], runtime: List[Param]) -> bool:
    if [(n, k) for n, k, _ in stub] != [(n, k) for n, k, _ in runtime]:
        return False
    return all(s == r or "<any>" in (s, r) for (_, _, s), (_, _, r) in zip(stub, runtime))


def _stubs() -> Tuple[Dict[str, ast.AST], Dict[str, Dict[str, ast.AST]]]:
    tree = ast.parse(STUBS.read_text())
    top: Dict[str, ast.AST] = {}
    classes: Dict[str, Dict[str, ast.AST]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            top[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top[node.target.id] = node
        elif isinstance(node, ast.ClassDef):
            top[node.name] = node
            classes[node.name] = {m.name: m for m in node.body if isinstance(m, ast.FunctionDef)}
    return top, classes


def _public(names: List[str]) -> set:
    return {n for n in names if not n.startswith("_") or n in ("__len__", "__contains__", "__enter__", "__exit__",
                                                              "__version__")}


def test_the_stubs_name_exactly_what_the_module_defines():
    top, _ = _stubs()
    runtime = _public([n for n in dir(_core) if n not in ("__all__",)]) - {"__version__"}
    assert set(_public(list(top))) - {"__version__"} == runtime
    assert hasattr(_core, "__version__") and "__version__" in top


@pytest.mark.parametrize("cls", ["Store", "Ticket"])
def test_each_class_has_the_stubs_methods_and_properties(cls):
    _, classes = _stubs()
    stub = classes[cls]
    runtime = getattr(_core, cls)
    members = {n for n in vars(runtime) if not n.startswith("_")} | {
        n for n in ("__len__", "__contains__", "__enter__", "__exit__") if n in vars(runtime)}
    assert set(_public(list(stub))) == members
    for name, node in stub.items():
        obj = vars(runtime)[name]
        is_property = any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list)
        assert is_property == (type(obj).__name__ == "getset_descriptor"), f"{cls}.{name}: property or method"
        if not is_property and name not in ("__len__", "__contains__"):
            assert _same(_stub_params(node), _runtime_params(obj)), (
                f"{cls}.{name}: stub {_stub_params(node)} vs bindings {_runtime_params(obj)}")


def test_module_functions_have_the_bindings_signatures():
    top, _ = _stubs()
    for name, node in top.items():
        obj = getattr(_core, name, None)
        if isinstance(node, ast.FunctionDef):
            assert callable(obj), name
            assert _same(_stub_params(node), _runtime_params(obj)), (
                f"{name}: stub {_stub_params(node)} vs bindings {_runtime_params(obj)}")


def test_a_drifted_stub_is_caught(tmp_path, monkeypatch):
    """The check itself: a stub with a renamed keyword no longer matches."""
    drifted = STUBS.read_text().replace("io_timeout: Optional[float] = 60.0", "timeout: Optional[float] = 60.0")
    assert drifted != STUBS.read_text()
    path = tmp_path / "_core.pyi"
    path.write_text(drifted)
    monkeypatch.setattr(__import__(__name__), "STUBS", path)
    with pytest.raises(AssertionError, match=r"Store\.open"):
        test_each_class_has_the_stubs_methods_and_properties("Store")
