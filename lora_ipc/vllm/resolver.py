"""A vLLM ``LoRAResolver``: the OpenAI server resolves ``"model": "<adapter>"`` or ``"<adapter>@v<N>"``
to a ``lora-ipc://`` request. ``<adapter>@v<N>`` is pinned to version N of the exporter's current
epoch; a bare ``<adapter>`` serves the newest version at request time (vLLM caches the first
resolution by name; :mod:`.openai` moves a bare name's entry to the newest version on each request).
A malformed or oversized version, like a name the exporter does not know, is "not found" (None)."""

from __future__ import annotations

import logging
import re

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from ..errors import LoraIpcError
from ..lru import BoundedLRU
from . import api_io
from .request import lora_int_id_for, resolve
from .uri import AdapterURI

log = logging.getLogger("lora_ipc.vllm")
MAX_VERSION_DIGITS = 18
_PINNED = re.compile(r"(.+)@v([0-9]+)")
_VERSION = re.compile(rf"[1-9][0-9]{{0,{MAX_VERSION_DIGITS - 1}}}")

#: lora_path -> model name of the entries made for bare names (they follow the newest version)
FOLLOWING: BoundedLRU[str, str] = BoundedLRU(4096)


def parse_model_name(lora_name: str) -> tuple[str, int | None] | None:
    """(adapter name, pinned version or None); None when the name pins a malformed or oversized version."""
    if not isinstance(lora_name, str) or not lora_name or len(lora_name) > 1024:
        return None
    m = _PINNED.fullmatch(lora_name)
    if m is None:
        return lora_name, None
    if not _VERSION.fullmatch(m.group(2)):
        return None
    return m.group(1), int(m.group(2))


class LoraIpcResolver(LoRAResolver):
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        parsed = parse_model_name(lora_name)
        if parsed is None:
            log.info("lora-ipc resolver: %r names no valid version", lora_name[:80])
            return None
        name, pinned = parsed
        try:
            version, epoch = await api_io.call(self.endpoint, resolve, name, self.endpoint, pinned)
        except LoraIpcError as exc:
            log.info("lora-ipc resolver: %s", exc)
            return None
        path = str(AdapterURI(name, version, self.endpoint, epoch or None))
        if pinned is None:
            FOLLOWING.put(path, lora_name)
        return LoRARequest(
            lora_name=lora_name, lora_int_id=lora_int_id_for(name, version, epoch or None), lora_path=path
        )


def register_resolver(endpoint: str) -> None:
    LoRAResolverRegistry.register_resolver("lora_ipc", LoraIpcResolver(endpoint))
