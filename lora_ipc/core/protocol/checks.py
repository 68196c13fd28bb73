"""Checks, with the wire's own declarations, of values other modules build from a peer's data."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import msgspec

from ..errors import ProtocolError
from .errortext import explain_item

_FIELD_TYPES: dict[type, tuple[tuple[str, ...], Any]] = {}


def check_fields(obj: Any, what: str) -> None:
    """Check the attributes of ``obj`` (a dataclass or Struct) against its class's annotated field types
    (their ``Meta`` bounds), for classes that others construct from a peer's values (vLLM builds its init
    and update infos from dicts; Ray hands a relay a replica's metadata), so that ``__post_init__`` or
    the receiver validates with the same declarations msgspec decodes with. Raises ProtocolError naming
    the field."""
    cls = type(obj)
    names, types = _FIELD_TYPES.get(cls) or _FIELD_TYPES.setdefault(cls, _annotated_fields(cls))
    try:
        msgspec.convert(tuple(getattr(obj, n) for n in names), types, strict=True)
    except msgspec.ValidationError as exc:
        where, why = explain_item(str(exc), names)
        raise ProtocolError(f"{what} {where!r}: {why}") from None


def _annotated_fields(cls: type) -> tuple[tuple[str, ...], Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    if dataclasses.is_dataclass(cls):
        names = tuple(f.name for f in dataclasses.fields(cls) if f.name in hints)
    else:
        names = cls.__struct_fields__  # type: ignore[attr-defined]  # a Struct class
    return names, tuple[tuple(hints[n] for n in names)]  # type: ignore[misc]  # built at run time
