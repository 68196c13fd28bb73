"""How a typed error crosses a boundary: its code (a class name of ``errors.WIRE_ERRORS``) and message.

- lora_ipc's own socket: an ``ErrorReply`` (``error`` = the code, ``message``); :func:`code_of` picks the
  code a raised error is sent with, :func:`from_code` the class a received one is raised as.
- vLLM RPCs (``collective_rpc``, the engine's utility calls) hand a worker's exception to the caller as
  text only (``Exception(f"Call to ... failed: {exc}")``), and Ray wraps that text again. So an error meant
  to cross them starts its message with a tag, the code and the message's length::

      [lora_ipc:<code>:<length>] <message>

  ``<code>``: a letter, then up to 63 letters, digits or ``_``; ``<length>``: 1 to 7 decimal digits, the
  characters of ``<message>`` that belong to the error (anything after is a wrapper's). The caller reads
  the first tag back (the outermost error: wrapping only ever prepends) and raises that class
  (:func:`carried`). A code no class of this process registered arrives as ``LoraIpcError``.
"""

from __future__ import annotations

import re

from ..errors import WIRE_ERRORS, LoraIpcError, error_code
from .limits import MAX_ERROR_CODE_CHARS

#: ``[lora_ipc:<code>:<length>] ``: group 1 the code, group 2 the message's length
TAG = re.compile(rf"\[lora_ipc:([A-Za-z][A-Za-z0-9_]{{0,{MAX_ERROR_CODE_CHARS - 1}}}):([0-9]{{1,7}})\] ")


def code_of(exc: LoraIpcError) -> str:
    """The code an ``ErrorReply`` names for ``exc``: its class's, or its nearest registered base's (as in a tag)."""
    return error_code(type(exc))


def from_code(code: str) -> type[LoraIpcError]:
    """The class a received code is raised as (``LoraIpcError`` for an unknown one)."""
    return WIRE_ERRORS.get(code, LoraIpcError)


def tag(cls: type[LoraIpcError], message: str) -> str:
    """``message`` prefixed with the code of ``cls``: what :func:`carried` reads back on the other side.
    A message tagged already is left as it is (an error re-raised on its way out keeps its one tag)."""
    if TAG.match(message):
        return message
    return f"[lora_ipc:{error_code(cls)}:{len(message)}] {message}"


def tagged(cls: type[LoraIpcError], message: str) -> LoraIpcError:
    """A ``cls`` to raise where the error will cross a vLLM RPC or Ray call (see :func:`carried`)."""
    return _build(cls, tag(cls, message))


def carried(exc: BaseException) -> LoraIpcError | None:
    """The lora_ipc error ``exc`` is or carries, as its own class with its own message; None if none.

    In order: ``exc`` or an exception it was raised from (``__cause__``/``__context__``, e.g. an in-process
    engine) that is a :class:`LoraIpcError`; else the first tag (:func:`tag`) in ``str(exc)`` (a worker's
    error that came back as text). A tag naming an unknown code gives :class:`LoraIpcError`.
    """
    seen: BaseException | None = exc
    for _ in range(16):
        if seen is None:
            break
        if isinstance(seen, LoraIpcError):  # in-process: the error itself (its tag, if any, taken off)
            m = TAG.match(str(seen))
            return seen if m is None else _build(type(seen), _message(str(seen), m))
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    m = TAG.search(text)
    if m is None:
        return None
    return _build(from_code(m.group(1)), _message(text, m))


def _message(text: str, m: re.Match) -> str:
    return text[m.end() : m.end() + int(m.group(2))]


def _build(cls: type[LoraIpcError], message: str) -> LoraIpcError:
    try:
        return cls(message)
    except TypeError:  # a class that takes more than a message (e.g. EngineLoadError): its nearest base then
        base = WIRE_ERRORS[error_code(cls)]
        return base(message) if base is not cls else LoraIpcError(message)
