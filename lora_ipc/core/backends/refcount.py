"""torch's CUDA IPC ref counters, read and changed from Python (no CUDA needed).

``reduce_tensor`` on a CUDA tensor hands out, with each export, a slot in a shared-memory ref-counter
file (``ref_counter_handle``, ``ref_counter_offset``; torch/csrc/CudaIPCTypes.cpp). The slot starts at
1; the importing process subtracts 1 when its storage dies (StorageSharing.cpp, the IPC deleter), and
the exporter frees its block only once every slot of the storage reads 0 (else ``CudaIPCSentDataDelete``
parks it in torch's limbo). torch's own release, ``UntypedStorage._release_ipc_counter_cuda``, raises
"CUDA is not available" in a process without CUDA (a host-fallback consumer), so lora_ipc opens the file
itself: a POSIX shm object (``/dev/shm/<name>``) written by ``at::RefcountedMapAllocator``, whose data
starts after a 64-byte header (``kDataOffset``), int64 slots (the layout: ``lora_ipc.core.protocol.tables``).
Every access is best effort, as torch's is:
a file that is gone (its producer exited) is not an error.
"""

from __future__ import annotations

import mmap
import os

from ..errors import BackendError
from ..memory.shm import open_regular
from ..protocol.tables import REFCOUNT_SLOT as SLOT
from ..protocol.tables import refcount_offset


def _path(handle: bytes | str) -> str | None:
    name = handle.decode() if isinstance(handle, bytes) else handle
    name = name.lstrip("/")
    if not name or "/" in name or name in (".", ".."):
        return None
    return os.path.join("/dev/shm", name)


def _map(handle: bytes | str, offset: int):
    path = _path(handle)
    if path is None or offset < 0:
        return None, None

    try:  # a name the exporter chose: nothing but a regular file of ours is opened (no FIFO, no device)
        fd = open_regular(path, os.O_RDWR, follow=False)
    except BackendError:
        return None, None
    try:
        size = os.fstat(fd).st_size
        at = refcount_offset(offset)
        if at + SLOT.size > size:
            return None, None
        return mmap.mmap(fd, size), at
    except (OSError, ValueError):
        return None, None
    finally:
        os.close(fd)


def read(handle: bytes | str, offset: int) -> int | None:
    """The slot's value, or None if the file is gone or the slot is out of range."""
    mapped, at = _map(handle, offset)
    if mapped is None:
        return None
    with mapped:
        return SLOT.unpack_from(mapped, at)[0]


def add(handle: bytes | str, offset: int, delta: int) -> int | None:
    """Add ``delta`` to the slot; the new value, or None if the file is gone."""
    mapped, at = _map(handle, offset)
    if mapped is None:
        return None
    with mapped:
        value = SLOT.unpack_from(mapped, at)[0] + delta
        SLOT.pack_into(mapped, at, value)
        return value
