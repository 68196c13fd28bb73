"""``lora-ipc://`` URIs: what a vLLM ``LoRARequest.lora_path`` carries to the worker.

``lora-ipc://<name>/v<version>?endpoint=<endpoint>`` (name and endpoint percent-encoded). The version
is part of the path so vLLM's prefix cache, keyed by (lora_name, lora_path), never mixes versions.
Without ``/v<version>`` the worker loads the newest version at load time; without ``endpoint`` it uses
``$LORA_IPC_ENDPOINT``. No vLLM import here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ..endpoint import ENV_ENDPOINT
from ..errors import LoraIpcError

SCHEME = "lora-ipc"


@dataclass(frozen=True)
class AdapterURI:
    name: str
    version: int | None
    endpoint: str

    def __str__(self) -> str:
        version = "" if self.version is None else f"/v{self.version}"
        return f"{SCHEME}://{quote(self.name, safe='')}{version}?endpoint={quote(self.endpoint, safe='')}"

    @staticmethod
    def matches(path: object) -> bool:
        return isinstance(path, str) and path.startswith(f"{SCHEME}://")

    @classmethod
    def parse(cls, uri: str) -> AdapterURI:
        parts = urlsplit(uri)
        if parts.scheme != SCHEME or not parts.netloc:
            raise LoraIpcError(f"not a {SCHEME}:// adapter URI: {uri!r}")
        name = unquote(parts.netloc)
        version = None
        if parts.path not in ("", "/"):
            m = re.fullmatch(r"/v([1-9][0-9]*)/?", parts.path)
            if not m:
                raise LoraIpcError(f"{uri!r}: the path must be /v<version>, got {parts.path!r}")
            version = int(m.group(1))
        query = parse_qs(parts.query)
        endpoint = query.get("endpoint", [os.environ.get(ENV_ENDPOINT, "")])[0]
        if not endpoint:
            raise LoraIpcError(f"{uri!r} names no endpoint and ${ENV_ENDPOINT} is not set in the engine")
        return cls(name, version, endpoint)
