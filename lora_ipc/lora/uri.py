"""``lora-ipc://`` URIs: what a vLLM ``LoRARequest.lora_path`` carries to the worker.

``lora-ipc://<name>/v<version>?endpoint=<endpoint>&epoch=<epoch>`` (name and endpoint percent-encoded; the
grammar and its limits are declared in :mod:`lora_ipc.core.protocol.uri`).
The version is part of the path so vLLM's prefix cache, keyed by (lora_name, lora_path), never mixes
versions. ``epoch`` is the exporter's store epoch (random per start): version numbers start again when
a daemon restarts, so a pinned version is only meaningful with its epoch, and a URI of an earlier
epoch is refused (``StaleEpoch``) instead of being served other bytes. A pinned version without an
epoch is refused here (``BadAdapterURI``). Without ``/v<version>`` the worker loads the newest version
at load time (of whatever epoch); without ``endpoint`` it uses ``$LORA_IPC_ENDPOINT``. ``&follow=1``
marks the entry the OpenAI server made for a bare model name: the worker loads the version the path
names, and the API process moves the entry to the newest version on every request (:mod:`.openai`).
Every name the store accepts (``protocol.check_name``) and every endpoint ``ipc_path`` accepts make a URI
within ``MAX_URI_CHARS`` that parses back to them (docs/guides/naming.md). No vLLM import here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ..core import settings
from ..core.channels.endpoint import ENV_ENDPOINT, ipc_path
from ..core.errors import BadAdapterURI, LoraIpcError
from ..core.protocol import MAX_NAME_CHARS
from ..core.protocol.uri import (
    EPOCH_PATTERN,
    FOLLOW,
    MAX_ENDPOINT_CHARS,
    MAX_URI_CHARS,
    QUERY_KEYS,
    SCHEME,
    VERSION_PATH,
)

__all__ = ["MAX_ENDPOINT_CHARS", "MAX_URI_CHARS", "SCHEME", "AdapterURI"]

EPOCH_RE = re.compile(EPOCH_PATTERN)
_VERSION_PATH = re.compile(VERSION_PATH)


@dataclass(frozen=True)
class AdapterURI:
    name: str
    version: int | None
    endpoint: str
    epoch: str | None = None
    follow: bool = False  # a bare model name's entry: the API process moves it to the newest version

    def __str__(self) -> str:
        version = "" if self.version is None else f"/v{self.version}"
        epoch = "" if self.epoch is None else f"&epoch={self.epoch}"
        follow = f"&follow={FOLLOW}" if self.follow else ""
        return (
            f"{SCHEME}://{quote(self.name, safe='')}{version}?endpoint={quote(self.endpoint, safe='')}{epoch}{follow}"
        )

    @staticmethod
    def matches(path: object) -> bool:
        """One rule with :meth:`parse`: the scheme is case-insensitive (RFC 3986 §3.1)."""
        return isinstance(path, str) and path[: len(SCHEME) + 3].lower() == f"{SCHEME}://"

    @classmethod
    def parse(cls, uri: str) -> AdapterURI:
        """Parse a URI; anything malformed (including a tcp:// endpoint) raises ``BadAdapterURI``."""
        if not cls.matches(uri) or len(uri) > MAX_URI_CHARS:
            raise BadAdapterURI(f"not a {SCHEME}:// adapter URI: {uri!r:.200}")
        try:
            parts = urlsplit(uri)
            name = unquote(parts.netloc, errors="strict")
            m = _VERSION_PATH.fullmatch(parts.path)
            query = parse_qs(parts.query, strict_parsing=bool(parts.query), max_num_fields=8)
        except ValueError as exc:
            raise BadAdapterURI(f"{uri!r:.200}: {exc}") from None
        if not 1 <= len(name) <= MAX_NAME_CHARS:
            raise BadAdapterURI(f"{uri!r:.200}: an adapter name has 1 to {MAX_NAME_CHARS} characters")
        if not m:
            raise BadAdapterURI(f"{uri!r:.200}: the path must be /v<version>, got {parts.path!r:.60}")
        version = int(m.group(1)) if m.group(1) else None
        if set(query) - set(QUERY_KEYS) or any(len(v) > 1 for v in query.values()):
            raise BadAdapterURI(f"{uri!r:.200}: the query parameters are one endpoint=, epoch= and follow=")
        if query.get("follow", [FOLLOW])[0] != FOLLOW:
            raise BadAdapterURI(f"{uri!r:.200}: follow= is 1 or absent")
        epoch = query.get("epoch", [None])[0]
        if epoch is not None and not EPOCH_RE.fullmatch(epoch):
            raise BadAdapterURI(f"{uri!r:.200}: epoch must be 1-16 hex digits")
        endpoint = query.get("endpoint", [str(settings.value(ENV_ENDPOINT) or "")])[0]
        if not endpoint:
            raise BadAdapterURI(f"{uri!r:.200} names no endpoint and ${ENV_ENDPOINT} is not set in the engine")
        try:
            ipc_path(endpoint)
        except LoraIpcError as exc:  # what ipc_path raises for a tcp:// or unusable endpoint
            raise BadAdapterURI(str(exc)) from None
        if m.group(1) and epoch is None:
            raise BadAdapterURI(
                f"{uri!r:.200}: a pinned version needs the exporter's epoch (&epoch=..., see "
                "lora_ipc.vllm.lora_request): version numbers start again when an exporter restarts"
            )
        return cls(name, version, endpoint, epoch, "follow" in query)
