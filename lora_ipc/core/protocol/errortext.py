"""msgspec's validation errors in this protocol's words: ``field 'path': what`` (decoded frames) and
``<what> 'field': what`` (values checked by checks.py). Only the text changes; the error stays a ProtocolError."""

from __future__ import annotations

import re

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$\.?(?P<path>.*)`)?$", re.S)
_AT_ITEM = re.compile(r"^(?P<what>.*?) - at `\$\[(?P<i>\d+)\](?P<rest>.*)`$", re.S)
_HEADER_ITEM = re.compile(r"at `\$\[[0-2]\]`$")


def explain(text: str) -> str:
    """A msgspec validation error of a message body: ``field 'path': what``."""
    m = _AT.match(text)
    if m is None:  # the pattern matches any text; kept for the type checker
        return text
    what, path = m.group("what"), m.group("path") or "body"
    what = re.sub(r"Object contains unknown field `(.*)`", r"unknown key '\1'", what)
    if path.endswith("backend") and what.startswith("Invalid value"):
        what = "unknown backend" + what[len("Invalid value") :]
    if "got `ext`" in what:
        what = f"undecodable msgpack (ext types are refused): {what}"
    return f"field {path!r}: {what}"


def at_path(text: str, prefix: str) -> str:
    """``text`` with its path ``$...`` read as under field ``prefix`` (a tree decoded on its own)."""
    return text.replace("`$", f"`$.{prefix}", 1)


def explain_item(text: str, names: tuple[str, ...]) -> tuple[str, str]:
    """(field, what) of a msgspec error about a tuple whose items are the fields ``names``."""
    m = _AT_ITEM.match(text)
    if m is None:
        return "?", text
    return f"{names[int(m['i'])]}{m['rest']}", m["what"]


def is_header_item(text: str) -> bool:
    """Whether a msgspec error is about one of a frame's three header scalars."""
    return _HEADER_ITEM.search(text) is not None
