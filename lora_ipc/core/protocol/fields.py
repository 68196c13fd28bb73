"""The field types of the ZeroMQ messages: each carries its bounds (``msgspec.Meta``), so the same declaration
decodes a frame and checks a value others built (checks.py). Names (:func:`check_name`) and configs (JSON-like
trees of bounded depth, characters and node count) are declared here too."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Annotated, Any

from msgspec import Meta

from ..errors import BadName
from .descriptors import TOKEN_BYTES
from .limits import I64, MAX_BYTE_OFFSET, MAX_NAME_CHARS, MAX_TREE_CHARS, MAX_TREE_DEPTH
from .uri import EPOCH_PATTERN, MAX_EPOCH_CHARS

Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]

#: the end of a pinned model name, ``<name>@v<N>``: vLLM's OpenAI server reads ``"exp@v2"`` as version 2 of
#: ``exp`` (``lora_ipc.vllm.resolver``), so no tensor set may be published under a name that ends like this
PINNED_SUFFIX = re.compile(r"@v[0-9]+\Z")


def check_name(name: object) -> str:
    """``name`` when it may be published; else ``BadName`` saying why. The rules (docs/guides/naming.md): a str of
    1 to ``MAX_NAME_CHARS`` characters that is valid UTF-8 (no lone surrogates: it must cross the wire and a
    ``lora-ipc://`` URI), and does not end in ``@v<digits>`` (it would read as a pinned version)."""
    if type(name) is not str:
        raise BadName(f"a name is a str, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise BadName(f"a name has 1 to {MAX_NAME_CHARS} characters, not {len(name)}")
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise BadName(f"{name!r:.80} is not valid UTF-8 (a lone surrogate)") from None
    pinned = PINNED_SUFFIX.search(name)
    if pinned:
        raise BadName(
            f"{name!r:.80} ends in '@v<digits>', which reads as a pinned version of "
            f"{name[: pinned.start()]!r:.80} (docs/guides/naming.md); choose another name"
        )
    return name


SlabId = Annotated[str, Meta(min_length=1, max_length=128)]
Digest = Annotated[bytes, Meta(min_length=16, max_length=16)]
Token = Annotated[bytes, Meta(min_length=TOKEN_BYTES, max_length=TOKEN_BYTES)]  # descriptors.py
#: A store's epoch (``store.new_epoch``): 1 to 16 lowercase hex digits, as in a ``lora-ipc://`` URI (uri.py).
Epoch = Annotated[str, Meta(min_length=1, max_length=MAX_EPOCH_CHARS, pattern=rf"\A{EPOCH_PATTERN}\Z")]
Positive = Annotated[int, Meta(ge=1, le=I64)]
Count = Annotated[int, Meta(ge=0, le=I64)]
Pid = Annotated[int, Meta(ge=1, le=1 << 31)]
ByteOffset = Annotated[int, Meta(ge=0, le=MAX_BYTE_OFFSET)]
#: a float that is not NaN (which fails every comparison, so any bound refuses it) nor -inf
Number = Annotated[float, Meta(ge=-sys.float_info.max)]


def tree(depth: int = MAX_TREE_DEPTH, max_chars: int = MAX_TREE_CHARS) -> Any:
    """A JSON-like map (a LoRA adapter_config.json): str keys; None, bool, int, float (not NaN), str, arrays
    and maps as values, at most ``depth`` levels below the root (deeper is refused as it is read, before
    it is built). Node counts: :func:`check_tree`."""
    text = Annotated[str, Meta(min_length=0, max_length=max_chars)]
    scalar = None | bool | int | Number | text
    node: Any = scalar
    for _ in range(depth - 1):
        node = None | bool | int | Number | text | list[node] | dict[text, node]
    return dict[text, node]


if TYPE_CHECKING:  # built at run time, with its bounds; to a type checker, a JSON-like map
    Config = dict[str, Any]
else:
    Config = tree()


def check_tree(value: Any, max_nodes: int, where: str) -> None:
    """Refuse a tree (already typed by :func:`tree`) of more than ``max_nodes`` values."""
    budget, stack = max_nodes, [value]
    while stack:
        v = stack.pop()
        budget -= 1
        if budget < 0:
            raise ValueError(f"{where}: more than {max_nodes} values")
        if type(v) is dict:
            stack.extend(v.values())
        elif type(v) is list:
            stack.extend(v)
