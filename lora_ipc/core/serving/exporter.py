"""Trainer side: ``TensorSetExporter`` (store + server thread in this process) and ``RemoteTensorSetExporter``
(publish into a ``lora-ipc serve`` daemon, which keeps its own copy). Both publish named tensor sets:
adapters.py publishes LoRA adapters through them, refit.py weight buckets."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Self

import msgspec
import torch

from ..backends import ExportedSlab, backend_for, slab_device
from ..channels.connection import Connection
from ..channels.endpoint import daemon_endpoint, default_endpoint
from ..channels.fdchannel import push_fd
from ..memory.layout_cache import LayoutCache
from ..protocol import PublishReply, PublishRequest, SlabHandle
from .server import TensorSetServer
from .store import Limits, TensorSetStore


class TensorSetExporter:
    """Publish versions of named tensor sets from this process; readers fetch them with a
    :class:`~lora_ipc.core.fetching.client.TensorSetClient`.

    ``keep`` newest versions of each name stay fetchable. ``device`` is where slabs live (default:
    where the published tensors are). ``check_finite`` rejects NaN/Inf at publish time (one extra read
    of the slab and one synchronize).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        keep: int = 2,
        device: torch.device | str | None = None,
        lease_timeout_s: float = 30.0,
        check_finite: bool = False,
        limits: Limits | None = None,
    ):
        self.endpoint = endpoint or default_endpoint()
        self.device = device
        self.store = TensorSetStore(
            keep=keep, lease_timeout_s=lease_timeout_s, check_finite=check_finite, limits=limits
        )
        self._server = TensorSetServer(self.store, self.endpoint).start()
        self._closed = False

    def publish(self, name: str, tensors: Mapping[str, torch.Tensor], config: dict | None = None) -> int:
        """Pack ``tensors`` (and ``config``, a JSON-like map) as the next version of ``name``."""
        return self.store.publish(name, tensors, config, device=self.device)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._server.stop()
            self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteTensorSetExporter:
    """Publish into a ``lora-ipc serve`` daemon: same ``publish``/``close`` as :class:`TensorSetExporter`.

    Each publish packs into a staging slab this process exports (reused across publishes), and the
    daemon copies it into a slab of its own (device to device on GPU) before answering, so the version
    outlives this process. The CPU staging slab is a sealed memfd: it vanishes with this process,
    however it exits.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        device: torch.device | str | None = None,
        timeout_s: float = 30.0,
        trusted_uids: set[int] | None = None,
    ):
        self.endpoint = endpoint or daemon_endpoint()
        self.device = device
        self._conn = Connection(self.endpoint, timeout_s, trusted_uids=trusted_uids)
        self._trusted_uids, self._timeout_s = trusted_uids, timeout_s
        self._staging: ExportedSlab | None = None
        self._layouts = LayoutCache()

    def publish(self, name: str, tensors: Mapping[str, torch.Tensor], config: dict | None = None) -> int:
        layout = self._layouts.layout_for(tensors)
        slab = self._staging_slab(slab_device(self.device, tensors), layout.used_bytes)
        slab.pack(layout, tensors)
        slab.mark_ready()
        handle = self._handle_for_daemon(slab)
        reply = self._conn.request(
            PublishRequest(name, config or {}, handle, layout.to_wire(), layout.used_bytes), PublishReply
        )
        return reply.version

    def _staging_slab(self, device: torch.device, nbytes: int) -> ExportedSlab:
        """The staging slab, replaced when it is too small, on another device or worn out (CUDA: too many exports)."""
        slab = self._staging
        if slab is None or slab.nbytes < nbytes or slab.device != device or slab.worn_out:
            if slab is not None:
                slab.close()
            # torch's CUDA IPC: the daemon opens a publisher's staging slab without the descriptor channel
            slab = self._staging = backend_for(device, cuda_export="torch").allocate(nbytes)
        return slab

    def _handle_for_daemon(self, slab: ExportedSlab) -> SlabHandle:
        """A handle for one import by the daemon: on CUDA a fresh export (the daemon imports the first and
        consumes the rest: Note [one export per import] in backends/cuda.py); on CPU the staging memfd pushed to
        the daemon's descriptor channel first, the only way it reaches the daemon (fdchannel.py), and named by
        the push's token. A daemon without a channel is ``FdChannelUnavailable`` (every ``lora-ipc serve``
        has one: something else listens at the endpoint)."""

        handle = slab.handle_for_import()
        if not (slab.passes_descriptor and handle.PASSES_DESCRIPTOR):
            return handle
        self._conn.vet()  # an endpoint of another uid is refused as such, before its channel is looked for
        fd = slab.descriptor()
        try:
            token = push_fd(self.endpoint, fd, self._trusted_uids, self._timeout_s)
        finally:
            os.close(fd)
        return msgspec.structs.replace(handle, token=token)

    def close(self) -> None:
        self._conn.close()
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
