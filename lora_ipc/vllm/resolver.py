"""A vLLM ``LoRAResolver``: the OpenAI server resolves ``"model": "<adapter>"`` or ``"<adapter>@v<N>"``
to a ``lora-ipc://`` request (newest version for a bare name, pinned at first resolution)."""

from __future__ import annotations

import asyncio
import logging
import re

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from ..errors import LoraIpcError
from .request import lora_int_id_for, resolve_version
from .uri import AdapterURI

log = logging.getLogger("lora_ipc.vllm")


class LoraIpcResolver(LoRAResolver):
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        m = re.fullmatch(r"(.+)@v([1-9][0-9]*)", lora_name)
        name, version = (m.group(1), int(m.group(2))) if m else (lora_name, None)
        try:
            version = await asyncio.to_thread(resolve_version, name, self.endpoint, version)
        except LoraIpcError as exc:
            log.info("lora-ipc resolver: %s", exc)
            return None
        return LoRARequest(lora_name=lora_name, lora_int_id=lora_int_id_for(name, version),
                           lora_path=str(AdapterURI(name, version, self.endpoint)))


def register_resolver(endpoint: str) -> None:
    LoRAResolverRegistry.register_resolver("lora_ipc", LoraIpcResolver(endpoint))
