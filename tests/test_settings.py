"""lora_ipc.core.settings: the one table of LORA_IPC_* variables. Every read goes through it, every bad value is a
ConfigError naming the variable, and docs/reference/configuration.md is the table."""

import ast
from pathlib import Path

import pytest

from lora_ipc.core import settings
from lora_ipc.core.errors import ConfigError, LoraIpcError

ROOT = Path(__file__).resolve().parent.parent


def test_docs_configuration_is_the_table():
    assert (ROOT / "docs" / "reference" / "configuration.md").read_text() == settings.markdown(), (
        "docs/reference/configuration.md is stale: python -m lora_ipc.core.settings > docs/reference/configuration.md"
    )


def test_no_module_reads_a_lora_ipc_variable_around_the_table():
    """Only settings.py may look LORA_IPC_* up in os.environ / os.getenv (one parser, one error type)."""
    offenders = []
    for path in (ROOT / "lora_ipc").rglob("*.py"):
        if path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in ("get", "getenv", "pop") and node.args:
                    first = node.args[0]
                    text = ast.unparse(first)
                    if "LORA_IPC" in text or text.startswith("ENV_"):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                text = ast.unparse(node.slice)
                if ("LORA_IPC" in text or text.startswith("ENV_")) and isinstance(node.ctx, ast.Load):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_every_name_in_code_is_in_the_table():
    """A LORA_IPC_* string anywhere in lora_ipc/ or csrc/ names a row (a variable nobody documents fails)."""
    import re

    found = set()
    for path in [*(ROOT / "lora_ipc").rglob("*.py"), *(ROOT / "csrc").rglob("*.c")]:
        found |= set(re.findall(r"\bLORA_IPC_[A-Z0-9_]+", path.read_text()))
    assert found - set(settings.SETTINGS) == set()


@pytest.mark.parametrize(
    "name, raw, expected",
    [
        ("LORA_IPC_TRANSPORT", "HOST", "host"),
        ("LORA_IPC_CUDA_EXPORT", "vmm", "vmm"),
        ("LORA_IPC_MAX_FETCH_BYTES", "12345", 12345),
        ("LORA_IPC_TIMEOUT_S", "2.5", 2.5),
        ("LORA_IPC_CONNECT_WAIT_S", "0", 0.0),
        ("LORA_IPC_WORKER_KEEP", "3", 3),
        ("LORA_IPC_ENDPOINT", "ipc:///tmp/x.sock", "ipc:///tmp/x.sock"),
    ],
)
def test_values_parse(monkeypatch, name, raw, expected):
    monkeypatch.setenv(name, raw)
    assert settings.value(name) == expected
    monkeypatch.setenv(name, "")
    assert settings.value(name) == settings.SETTINGS[name].default


@pytest.mark.parametrize(
    "name, raw",
    [
        ("LORA_IPC_TRANSPORT", "nvlink"),
        ("LORA_IPC_CUDA_EXPORT", "magic"),
        ("LORA_IPC_MAX_FETCH_BYTES", "lots"),
        ("LORA_IPC_MAX_FETCH_BYTES", "0"),
        ("LORA_IPC_MAX_FETCH_BYTES", "-1"),
        ("LORA_IPC_TIMEOUT_S", "nan"),
        ("LORA_IPC_TIMEOUT_S", "0"),
        ("LORA_IPC_CONNECT_WAIT_S", "-2"),
        ("LORA_IPC_WORKER_KEEP_BYTES", "4GiB"),
    ],
)
def test_bad_values_are_one_error_type_naming_the_variable(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError, match=name) as info:
        settings.value(name)
    assert isinstance(info.value, LoraIpcError) and isinstance(info.value, ValueError)


def test_readers_use_the_table(monkeypatch):
    from lora_ipc.core.backends.select import cuda_export_mode
    from lora_ipc.core.fetching.client import fetch_bytes_limit, transport_mode

    monkeypatch.setenv("LORA_IPC_TRANSPORT", "bogus")
    monkeypatch.setenv("LORA_IPC_CUDA_EXPORT", "bogus")
    monkeypatch.setenv("LORA_IPC_MAX_FETCH_BYTES", "bogus")
    for read in (transport_mode, cuda_export_mode, fetch_bytes_limit):
        with pytest.raises(ConfigError):
            read()
