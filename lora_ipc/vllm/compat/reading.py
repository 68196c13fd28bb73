"""Reading vLLM's functions and classes with ``ast``: shared by the runtime reader (the source of the
imported ``_load_adapter`` and ``__init__``\\ s) and the source reader (whole modules)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path
from typing import TypeGuard

from .expectations import LoadAdapterBody, Params

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def is_self_attr(node: ast.AST, attr: str | None = None) -> TypeGuard[ast.Attribute]:
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and (attr is None or node.attr == attr)
    )


def read_load_adapter(fn: FunctionNode) -> LoadAdapterBody:
    kwargs: set[str] = set()
    found = False
    worker_attrs: set[str] = set()
    manager_attrs: set[str] = set()
    validations: list[str] = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "from_local_checkpoint":
                found = True
                kwargs.update(k.arg for k in node.keywords if k.arg)
            elif is_self_attr(node.func.value, "_adapter_manager") and node.func.attr.startswith("_validate"):
                validations.append(node.func.attr)
        if isinstance(node, ast.Attribute):
            if is_self_attr(node):
                worker_attrs.add(node.attr)
            elif is_self_attr(node.value, "_adapter_manager"):
                manager_attrs.add(node.attr)
    manager_attrs -= set(validations)
    return LoadAdapterBody(
        frozenset(kwargs), found, frozenset(worker_attrs), frozenset(manager_attrs), tuple(dict.fromkeys(validations))
    )


def self_assignments(fn: ast.AST) -> frozenset[str]:
    """``self.<attr>`` assigned anywhere in ``fn`` (a function or a whole class)."""
    names: set[str] = set()
    for node in ast.walk(fn):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        names.update(t.attr for t in targets if is_self_attr(t))
    return frozenset(names)


def attribute_assignments(fn: ast.AST) -> frozenset[str]:
    """``<anything>.<attr>`` assigned anywhere in ``fn``."""
    names: set[str] = set()
    for node in ast.walk(fn):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        names.update(t.attr for t in targets if isinstance(t, ast.Attribute))
    return frozenset(names)


def parse_function(fn) -> FunctionNode | None:
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
    except (OSError, TypeError):
        return None
    node = ast.parse(source).body[0]
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def parse_class(cls) -> ast.ClassDef | None:
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    except (OSError, TypeError, SyntaxError):
        return None
    return node if isinstance(node, ast.ClassDef) else None


def params_from_ast(fn: FunctionNode, drop_first: bool) -> Params:
    a = fn.args
    positional_nodes = a.posonlyargs + a.args
    defaults_start = len(positional_nodes) - len(a.defaults)
    required = {p.arg for i, p in enumerate(positional_nodes) if i < defaults_start}
    required |= {p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is None}
    skip = positional_nodes[0].arg if drop_first and positional_nodes else None
    positional = tuple(p.arg for p in positional_nodes if p.arg != skip)
    names = positional + tuple(p.arg for p in a.kwonlyargs)
    return Params(names, positional, frozenset(required - {skip}), a.kwarg is not None)


def decorators(fn: FunctionNode) -> set[str]:
    return {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in fn.decorator_list}


def method(cls: ast.ClassDef, name: str) -> FunctionNode | None:
    return next(
        (n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None
    )


def method_params(cls: ast.ClassDef, name: str) -> Params | None:
    fn = method(cls, name)
    if fn is None:
        return None
    return params_from_ast(fn, drop_first="staticmethod" not in decorators(fn))


def top_level(tree: ast.Module) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    out[t.id] = node
    return out


def parse_module(path: Path) -> dict[str, ast.AST] | None:
    try:
        return top_level(ast.parse(path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def exported(tree: dict[str, ast.AST], path: Path) -> frozenset[str]:
    """Top-level names of a module, plus what it imports (a package's ``__init__`` re-exports)."""
    names = set(tree)
    try:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom):
                names.update(a.asname or a.name for a in node.names)
    except (OSError, SyntaxError, UnicodeDecodeError):
        pass
    return frozenset(names)


def ast_abstract(cls: ast.ClassDef) -> frozenset[str]:
    return frozenset(
        n.name
        for n in cls.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and "abstractmethod" in decorators(n)
    )


def class_fields(cls: ast.ClassDef) -> frozenset[str]:
    """Annotated class-level names and methods of ``cls`` (a dataclass's fields and its methods)."""
    return frozenset(
        n.target.id if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) else getattr(n, "name", "")
        for n in cls.body
        if isinstance(n, (ast.AnnAssign, ast.FunctionDef, ast.AsyncFunctionDef))
    ) - {""}
