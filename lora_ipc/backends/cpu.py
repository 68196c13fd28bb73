"""CPU backend: POSIX shared memory files under /dev/shm, mapped with ``torch.from_file(shared=True)``.

File names carry the exporter's pid (``lora-ipc.<pid>.<token>.<n>``) so that files left behind by
an exporter that died without unlinking are swept by the next exporter on the machine.
"""

from __future__ import annotations

import itertools
import os
import secrets
import stat

import torch

from ..errors import BackendError
from ..protocol import CpuSlabHandle
from .base import Backend, ExportedSlab, ImportedSlab

SHM_DIR = "/dev/shm"
PREFIX = "lora-ipc."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_files() -> list[str]:
    """Unlink slab files of this user whose exporter process no longer exists."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name.split(".")[1])
            path = os.path.join(SHM_DIR, name)
            if os.stat(path).st_uid == os.getuid() and not _pid_alive(pid):
                os.unlink(path)
                removed.append(path)
        except (ValueError, IndexError, OSError):
            continue
    return removed


def shm_files_of(pid: int) -> list[str]:
    """Slab files an exporter with this pid currently has (for status and leak checks)."""
    mark = f"{PREFIX}{pid}."
    try:
        return sorted(os.path.join(SHM_DIR, n) for n in os.listdir(SHM_DIR) if n.startswith(mark))
    except OSError:
        return []


class CpuExportedSlab(ExportedSlab):
    device = torch.device("cpu")

    def __init__(self, path: str, nbytes: int):
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        self.path = path
        self.nbytes = nbytes
        self.slab_id = os.path.basename(path)
        self.tensor = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self.handle = CpuSlabHandle(self.slab_id, nbytes, path)

    def mark_ready(self) -> None:
        pass  # CPU copies are complete when pack returns

    def close(self) -> None:
        self.tensor = torch.empty(0, dtype=torch.uint8)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class CpuImportedSlab(ImportedSlab):
    device = torch.device("cpu")

    def __init__(self, handle: CpuSlabHandle):
        try:
            st = os.stat(handle.path)
        except OSError as exc:
            raise BackendError(f"slab {handle.slab_id} is gone: {exc}") from None
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise BackendError(f"slab {handle.slab_id}: not a regular file owned by this user")
        if st.st_size < handle.nbytes:
            raise BackendError(f"slab {handle.slab_id}: file has {st.st_size} bytes, handle says {handle.nbytes}")
        self.slab_id = handle.slab_id
        self.nbytes = handle.nbytes
        self.tensor = torch.from_file(handle.path, shared=True, size=handle.nbytes, dtype=torch.uint8)

    def copy_into(self, dst: torch.Tensor) -> None:
        dst.copy_(self.tensor[:dst.numel()])

    def close(self) -> None:
        self.tensor = torch.empty(0, dtype=torch.uint8)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self):
        sweep_stale_files()
        self._token = secrets.token_hex(4)
        self._counter = itertools.count(1)

    def allocate(self, nbytes: int) -> CpuExportedSlab:
        path = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}.{self._token}.{next(self._counter)}")
        try:
            return CpuExportedSlab(path, nbytes)
        except OSError as exc:
            raise BackendError(f"cannot create shared memory {path} ({nbytes} bytes): {exc}") from None
