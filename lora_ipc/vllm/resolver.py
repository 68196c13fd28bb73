"""A vLLM ``LoRAResolver``: the OpenAI server resolves ``"model": "<adapter>"`` or ``"<adapter>@v<N>"``
to a ``lora-ipc://`` request (what each means: docs/guides/naming.md).

- ``<adapter>@v<N>`` is version N of the exporter's current epoch. No adapter can be named so (the
  store refuses names ending in ``@v<digits>`` at publish, ``protocol.check_name``), so the reading is
  never ambiguous.
- a bare ``<adapter>`` serves the newest version at request time: its entry's path is marked
  ``&follow=1``, and :mod:`.openai` moves the entry to the newest version on each request. The mark is
  in the entry itself, so nothing the API process bounds can forget that a name follows.

vLLM caches the first resolution by name; :mod:`.openai` re-checks it before every request. A
malformed or oversized version, like a name the exporter does not know, is "not found" (None)."""

from __future__ import annotations

import logging
import re

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from ..core.errors import LoraIpcError
from ..core.protocol import MAX_NAME_CHARS
from ..lora.uri import AdapterURI
from . import api_io
from .request import lora_int_id_for, resolve

log = logging.getLogger("lora_ipc.vllm")
MAX_VERSION_DIGITS = 18
_PINNED = re.compile(r"(.+)@v([0-9]+)")  # protocol.PINNED_SUFFIX: no published name ends like this
_VERSION = re.compile(rf"[1-9][0-9]{{0,{MAX_VERSION_DIGITS - 1}}}")
MAX_MODEL_NAME_CHARS = MAX_NAME_CHARS + 2 + MAX_VERSION_DIGITS


def parse_model_name(lora_name: str) -> tuple[str, int | None] | None:
    """(adapter name, pinned version or None); None when the name pins a malformed or oversized version."""
    if not isinstance(lora_name, str) or not lora_name or len(lora_name) > MAX_MODEL_NAME_CHARS:
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
        path = str(AdapterURI(name, version, self.endpoint, epoch or None, follow=pinned is None))
        return LoRARequest(
            lora_name=lora_name, lora_int_id=lora_int_id_for(name, version, epoch or None), lora_path=path
        )


def register_resolver(endpoint: str) -> None:
    LoRAResolverRegistry.register_resolver("lora_ipc", LoraIpcResolver(endpoint))
