"""Trainer side: ``AdapterExporter`` (store + server thread in this process) and ``RemoteExporter``
(publish into a ``lora-ipc serve`` daemon, which keeps its own copy)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .endpoint import default_endpoint
from .peft import adapter_from
from .server import AdapterServer
from .store import AdapterStore

log = logging.getLogger("lora_ipc.exporter")


class AdapterExporter:
    """Publish adapter versions from this process; engines fetch them with :class:`AdapterClient`.

    ``keep`` newest versions of each adapter stay fetchable. ``device`` is where slabs live (default:
    where the published tensors are). ``check_finite`` rejects NaN/Inf at publish time (one extra read
    of the adapter and one synchronize).
    """

    def __init__(self, endpoint: str | None = None, *, keep: int = 2, device: torch.device | str | None = None,
                 lease_timeout_s: float = 30.0, check_finite: bool = False):
        self.endpoint = endpoint or default_endpoint()
        self.device = device
        self.store = AdapterStore(keep=keep, lease_timeout_s=lease_timeout_s, check_finite=check_finite)
        self._server = AdapterServer(self.store, self.endpoint).start()
        self._closed = False

    def publish(self, name: str, adapter: Any, peft_config: Any = None) -> int:
        """Pack ``adapter`` (a PeftModel, or a dict of tensors with ``peft_config``) as the next version of ``name``."""
        tensors, config = adapter_from(adapter, peft_config)
        return self.store.publish(name, tensors, config, device=self.device)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._server.stop()
            self.store.close()

    def __enter__(self) -> AdapterExporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
