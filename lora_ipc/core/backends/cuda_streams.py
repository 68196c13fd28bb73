"""Which CUDA device (by UUID, as exporter and importer agree on it) and lora_ipc's own streams on it.

Note [lora_ipc's own streams]
    Every CUDA call lora_ipc makes on the data path runs with a stream of its own made current, on the
    slab's device and on the target device (:func:`copy_stream`, created through the driver API, not
    taken from torch's stream pool, which other code shares): the export (torch records its event on
    the current stream, or synchronizes it past ~1000 events), the import (``_new_shared_cuda`` makes
    the current stream wait on that event), the copy (a cross-device copy waits for the target's
    current stream), and the final drop of an import (torch's IPC deleter synchronizes the current
    stream). So none of them waits for model work queued on the caller's stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading

import torch

from ..errors import BackendError

log = logging.getLogger("lora_ipc.cuda")


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device_for_uuid(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    raise BackendError(f"GPU {uuid} of the exporter is not visible in this process (CUDA_VISIBLE_DEVICES)")


_streams: dict[int, torch.cuda.Stream] = {}
_streams_lock = threading.Lock()
CU_STREAM_NON_BLOCKING = 1


def _driver_stream(index: int) -> torch.cuda.Stream:
    """A stream created by ``cuStreamCreate`` in the device's primary context: no other code holds it."""
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, ctx, stream = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()

    def check(rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} returned CUresult {rc}")

    check(cuda.cuInit(0), "cuInit")
    check(cuda.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")  # kept: torch's ctx
    check(cuda.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
    try:
        check(cuda.cuStreamCreate(ctypes.byref(stream), CU_STREAM_NON_BLOCKING), "cuStreamCreate")
    finally:
        cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    return torch.cuda.ExternalStream(stream.value, device=torch.device("cuda", index))


def copy_stream(index: int) -> torch.cuda.Stream:
    """lora_ipc's own stream on a device (one per process, never destroyed)."""
    stream = _streams.get(index)
    if stream is None:
        with _streams_lock:
            stream = _streams.get(index)
            if stream is None:
                torch.cuda.init()
                try:
                    stream = _driver_stream(index)
                except Exception as exc:  # no driver library, a sandbox: a pooled stream still beats the caller's
                    log.warning(
                        "lora-ipc: cannot create a dedicated CUDA stream on device %d (%s); using one "
                        "from torch's pool",
                        index,
                        exc,
                    )
                    stream = torch.cuda.Stream(index)
                _streams[index] = stream
    return stream


@contextlib.contextmanager
def own_streams(*indices: int):
    """``indices[0]`` current, and lora_ipc's stream current on every one of ``indices``."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.cuda.device(indices[0]))
        for index in dict.fromkeys(indices):
            stack.enter_context(torch.cuda.stream(copy_stream(index)))
        yield copy_stream(indices[0])
