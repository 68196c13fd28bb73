"""The docs name only what exists: every LORA_IPC_* variable is a row of lora_ipc.core.settings, every repository
path and relative link resolves, every `bash scripts/…`, `lora-ipc …` and `python -m …` command exists, and
no page cites an internal issue number (history lives in CHANGELOG.md)."""

import importlib.util
import re
from pathlib import Path

import pytest

from lora_ipc.core import settings

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "requirements").glob("*.md")])
TOP = ("lora_ipc", "scripts", "tests", "benches", "docs", "csrc", "requirements", "examples", ".ci")
_TOPS = "|".join(re.escape(t) for t in TOP)
PATH = re.compile(rf"(?<![\w./-])((?:{_TOPS})/[\w./-]*[\w/])")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
ISSUE = re.compile(r"\b(?:issue|issues|stop) #?\d+\b|\(#\d+\)", re.I)


def _text(page: Path) -> str:
    return page.read_text()


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_variable_is_a_setting(page):
    named = set(re.findall(r"\bLORA_IPC_[A-Z0-9_]*[A-Z0-9]\b", _text(page)))
    # the test command's and the test suite's own switches are documented with them, not in the settings table
    sources = [p.read_text() for p in [*(ROOT / "scripts").iterdir(), *(ROOT / "tests").glob("*.py")] if p.is_file()]
    script_switches = {n for n in named if any(re.search(rf"\b{n}\b", text) for text in sources)}
    assert named - set(settings.SETTINGS) - script_switches == set()


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_path_and_link_exists(page):
    text = _text(page)
    missing = []
    for match in PATH.finditer(text):
        path = match.group(1)
        if text[match.end() : match.end() + 2].lstrip(".")[:1] in (
            "*",
            "<",
            "{",
        ):  # a pattern: bench_*.py, x.{json,png}
            continue
        if not (ROOT / path).exists():
            missing.append(path)
    for link in LINK.findall(re.sub(r"`[^`]*`", "", text)):  # links, not code that looks like one
        if "://" in link or link.startswith("mailto:"):
            continue
        if not (page.parent / link).resolve().exists():
            missing.append(f"link {link}")
    assert missing == []


def _cli_subcommands() -> set[str]:
    import argparse

    from lora_ipc.cli import build_parser

    found: set[str] = set()
    for action in build_parser()._actions:  # argparse keeps its subcommands here
        if isinstance(action, argparse._SubParsersAction):
            found |= set(action.choices)
    return found


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_command_exists(page):
    text = _text(page)
    missing = []
    for script in re.findall(r"\bbash ((?:scripts|benches|\.ci)/[\w./-]+)", text):
        if not (ROOT / script).is_file():
            missing.append(f"bash {script}")
    subcommands = _cli_subcommands()
    for sub in re.findall(r"(?:^|`|\$ )lora-ipc ([a-z][\w-]*)", text, re.M):
        if sub not in subcommands:
            missing.append(f"lora-ipc {sub}")
    for module in re.findall(r"python3? -m (lora_ipc(?:\.\w+)*)", text):
        if importlib.util.find_spec(module) is None:
            missing.append(f"python -m {module}")
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_internal_issue_numbers(page):
    assert ISSUE.findall(_text(page)) == []
