"""``lora-ipc://`` URIs: what a vLLM ``LoRARequest.lora_path`` carries to the worker.

``lora-ipc://<name>/v<version>?endpoint=<endpoint>&epoch=<epoch>`` (name and endpoint percent-encoded).
The version is part of the path so vLLM's prefix cache, keyed by (lora_name, lora_path), never mixes
versions. ``epoch`` is the exporter's store epoch (random per start): version numbers start again when
a daemon restarts, so a pinned version is only meaningful with its epoch, and a URI of an earlier
epoch is refused (``StaleEpoch``) instead of being served other bytes. A pinned version without an
epoch is refused here (``BadAdapterURI``). Without ``/v<version>`` the worker loads the newest version
at load time (of whatever epoch); without ``endpoint`` it uses ``$LORA_IPC_ENDPOINT``. No vLLM import here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .. import settings
from ..endpoint import ENV_ENDPOINT, ipc_path
from ..errors import BadAdapterURI, LoraIpcError

SCHEME = "lora-ipc"
EPOCH_RE = re.compile(r"[0-9a-f]{1,16}")


@dataclass(frozen=True)
class AdapterURI:
    name: str
    version: int | None
    endpoint: str
    epoch: str | None = None

    def __str__(self) -> str:
        version = "" if self.version is None else f"/v{self.version}"
        epoch = "" if self.epoch is None else f"&epoch={self.epoch}"
        return f"{SCHEME}://{quote(self.name, safe='')}{version}?endpoint={quote(self.endpoint, safe='')}{epoch}"

    @staticmethod
    def matches(path: object) -> bool:
        """One rule with :meth:`parse`: the scheme is case-insensitive (RFC 3986 §3.1)."""
        return isinstance(path, str) and path[: len(SCHEME) + 3].lower() == f"{SCHEME}://"

    @classmethod
    def parse(cls, uri: str) -> AdapterURI:
        """Parse a URI; anything malformed (including a tcp:// endpoint) raises ``BadAdapterURI``."""
        if not cls.matches(uri) or len(uri) > 4096:
            raise BadAdapterURI(f"not a {SCHEME}:// adapter URI: {uri!r:.200}")
        try:
            parts = urlsplit(uri)
            name = unquote(parts.netloc, errors="strict")
            m = re.fullmatch(r"(?:/v([1-9][0-9]{0,17}))?/?", parts.path)
            query = parse_qs(parts.query, strict_parsing=bool(parts.query), max_num_fields=8)
        except ValueError as exc:
            raise BadAdapterURI(f"{uri!r:.200}: {exc}") from None
        if not name:
            raise BadAdapterURI(f"{uri!r:.200} names no adapter")
        if not m:
            raise BadAdapterURI(f"{uri!r:.200}: the path must be /v<version>, got {parts.path!r:.60}")
        version = int(m.group(1)) if m.group(1) else None
        if set(query) - {"endpoint", "epoch"} or any(len(v) > 1 for v in query.values()):
            raise BadAdapterURI(f"{uri!r:.200}: the query parameters are one endpoint= and one epoch=")
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
        return cls(name, version, endpoint, epoch)
