"""The package's layers (docs/design/architecture.md, "Package layout"): a module imports only from its own
layer or lower ones, and siblings do not import each other. Read from the source with ``ast``: every import
counts, at the top, inside a function, or under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import lora_ipc

PACKAGE = Path(lora_ipc.__file__).parent

#: (module prefix, layer, group). The longest matching prefix decides. A module may import from a lower layer,
#: or from its own group; two groups of one layer are siblings and never import each other.
LAYERS: list[tuple[str, float, str]] = [
    ("lora_ipc.core.errors", 0, "core.basics"),
    ("lora_ipc.core.settings", 0, "core.basics"),
    ("lora_ipc.core.lru", 0, "core.basics"),
    ("lora_ipc.core.protocol", 0.1, "core.protocol"),
    ("lora_ipc.core.memory", 0.2, "core.memory"),
    ("lora_ipc._native", 0.2, "core.memory"),
    ("lora_ipc.core.channels", 0.3, "core.channels"),
    ("lora_ipc.core.backends", 0.4, "core.backends"),
    ("lora_ipc.core.serving", 0.5, "core.serving"),
    ("lora_ipc.core.fetching", 0.5, "core.fetching"),
    ("lora_ipc.core", 0.9, "core"),  # the core package's own __init__ (a docstring)
    ("lora_ipc.lora", 2, "lora"),
    ("lora_ipc.refit", 2, "refit"),
    ("lora_ipc", 2.5, "public"),  # the package's __init__: the public names, re-exported
    ("lora_ipc.vllm", 3, "vllm"),
    ("lora_ipc.ray", 3, "ray"),
    ("lora_ipc.integrations", 4, "integrations"),
    ("lora_ipc.cli", 5, "tools"),
    ("lora_ipc.__main__", 5, "tools"),
    ("lora_ipc.demo", 5, "tools"),
    ("lora_ipc.tiny", 5, "tools"),
    ("lora_ipc.benchmarks", 5, "tools"),
]


def layer_of(module: str) -> tuple[float, str]:
    best = max((p for p in LAYERS if module == p[0] or module.startswith(p[0] + ".")), key=lambda p: len(p[0]))
    return best[1], best[2]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of the lora_ipc modules (or packages) ``path`` imports (its text, or ``source``)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule, not pkg's __init__
                sub = f"{target}.{alias.name}"
                is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    PACKAGE.parent / sub.replace(".", "/") / "__init__.py"
                ).exists()
                found.add(sub if is_module or sub == "lora_ipc._native" else target)
    return {name for name in found if name == "lora_ipc" or name.startswith("lora_ipc.")}


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        here, group = layer_of(module)
        for target in sorted(imports_of(path)):
            there, their_group = layer_of(target)
            if there > here or (there == here and their_group != group):
                bad.append(f"{module} ({group}) imports {target} ({their_group})")
    return bad


def test_no_module_imports_upward_or_from_a_sibling():
    assert violations() == []


def test_every_module_has_a_layer():
    """A new top-level module must be placed in the table (else it would fall in the public façade's layer)."""
    unplaced = [
        module_name(p)
        for p in PACKAGE.rglob("*.py")
        if layer_of(module_name(p))[1] == "public" and p != PACKAGE / "__init__.py"
    ]
    assert unplaced == []


def test_the_check_sees_an_upward_import():
    """The reader finds a relative import inside a function, from the core up to the vLLM layer, and a
    submodule imported by name from its package."""
    errors = PACKAGE / "core" / "errors.py"
    probe = errors.read_text() + "\n\ndef _probe():\n    from ..vllm import loader\n    from .memory import shm\n"
    found = imports_of(errors, probe)
    assert {"lora_ipc.vllm.loader", "lora_ipc.core.memory.shm"} <= found
    assert layer_of("lora_ipc.vllm.loader")[0] > layer_of("lora_ipc.core.errors")[0]
