"""Sealed shared memory: memfds that cannot shrink, reserved up front, opened by peers through /proc.

Note [why memfds, not files in /dev/shm]
    A mapping of a file that another process truncates faults with SIGBUS on the next access, and a
    sparse file on a full tmpfs faults the same way on first write. Both killed processes when slabs
    were files in /dev/shm. A memfd created here is sized, reserved with ``posix_fallocate`` (a full
    machine shows up as an error at allocation, never as a fault later) and sealed with
    ``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``: nobody, not even its creator, can change its size
    again, so every mapping of it stays valid for its whole life. An importer checks the seals, the
    owner, the size, the memfd's name and that every byte of it is reserved (``st_blocks``) on the
    descriptor it opened, and reads it with ``pread`` (never through a mapping).
    A memfd has no path another user could pre-create, replace by a symlink or leave behind: it goes
    away with the last process that holds it, however that process exits.

    Peers open it as ``/proc/<pid>/fd/<fd>`` (same user, same pid namespace — one host or one pod).

Note [the reader never pays for the exporter's memory]
    A read fault through a mapping of a hole in a memfd allocates the page, charged to the reader:
    a hostile exporter's sparse 1 GiB slab cost its importer 1 GiB of shared memory on top of its own
    copy. Our exporters reserve every page (``posix_fallocate``), so an importer refuses a memfd whose
    allocated blocks do not cover its size, and it copies with ``pread``, which reads a hole (one
    punched after that check, say) as zeros without allocating anything. A fetch costs the reader
    its own copy and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import BackendError
from ..lru import BoundedLRU
from ..protocol.tables import (
    GENERATION_COUNTER,
    GENERATION_PREFIX,
    GENERATION_SLOTS,
    generation_offset,
    generation_table_bytes,
    generation_table_name,
)

MEMFD_PREFIX = "lora-ipc."
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def create_sealed(name: str, nbytes: int) -> int:
    """A new memfd named ``lora-ipc.<name>`` of exactly ``nbytes``, reserved and sealed; returns its fd."""
    try:
        fd = os.memfd_create(MEMFD_PREFIX + name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise BackendError(f"cannot create shared memory {name!r}: {exc}") from None
    try:
        os.ftruncate(fd, nbytes)
        os.posix_fallocate(fd, 0, nbytes)  # reserve every page now: ENOSPC/ENOMEM here, never SIGBUS later
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError as exc:
        os.close(fd)
        raise BackendError(f"cannot reserve {nbytes} bytes of shared memory for {name!r}: {exc}") from None
    return fd


def map_fd(fd: int, nbytes: int, *, writable: bool) -> torch.Tensor:
    """A uint8 tensor over ``nbytes`` of ``fd`` (shared mapping; read-only unless ``writable``)."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=prot)
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot map {nbytes} bytes of shared memory: {exc}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer": we never write through a read-only map
        return torch.frombuffer(mm, dtype=torch.uint8)


def open_regular(path: str, flags: int = os.O_RDONLY, *, follow: bool = True) -> int:
    """Open ``path`` (a name a peer chose) only if it is a regular file of this user; never blocks.

    Note [open nothing a peer chose before knowing what it is]
        ``open`` of a FIFO without a writer blocks for ever, and opening a device runs its driver. A path
        or ``/proc/<pid>/fd/<n>`` named by a peer is therefore first opened with ``O_PATH`` (which opens
        nothing: no driver, no FIFO wait), checked with ``fstat`` (a regular file owned by this user),
        and only then reopened through our own ``/proc/self/fd`` entry of that very inode, with
        ``O_NONBLOCK`` as a second guard. BackendError for anything else. ``follow=False``: a symlink is
        refused too (``/proc/<pid>/fd`` entries are links that must be followed)."""
    try:
        pinned = os.open(path, os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except OSError as exc:
        raise BackendError(f"{path} is gone or not ours: {exc}") from None
    try:
        check_regular(pinned, path)
        try:
            return os.open(f"/proc/self/fd/{pinned}", flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(f"cannot open {path}: {exc}") from None
    finally:
        os.close(pinned)


def check_regular(fd: int, what: str) -> None:
    """``fd`` is a regular file (a memfd is one) owned by this user: never a FIFO, socket or device."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise BackendError(f"cannot inspect {what}: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BackendError(f"{what} is not a regular file ({stat.filemode(st.st_mode)[0]!r}): refused")
    if st.st_uid != os.getuid():
        raise BackendError(f"{what} is not owned by this user (uid {st.st_uid})")


def open_sealed(pid: int, fd: int, name: str, min_bytes: int) -> int:
    """Open another process's sealed memfd ``lora-ipc.<name>`` read-only; every check is on the opened fd
    (Note [open nothing a peer chose before knowing what it is])."""
    try:
        opened = open_regular(f"/proc/{pid}/fd/{fd}")
    except BackendError as exc:
        raise BackendError(f"shared memory {name!r} of process {pid}: {exc}") from None
    try:
        check_sealed(opened, name, min_bytes)
    except BaseException:
        os.close(opened)
        raise
    return opened


def reopen_sealed(fd: int, name: str, min_bytes: int) -> int:
    """A read-only descriptor of the memfd ``fd`` (one that came by SCM_RIGHTS, possibly writable), after
    checking that ``fd`` is our sealed memfd ``lora-ipc.<name>``: nothing is opened before that. ``fd``
    is closed once this worked (left to the caller otherwise)."""
    check_sealed(fd, name, min_bytes)
    read_only = open_regular(f"/proc/self/fd/{fd}")
    try:
        check_sealed(read_only, name, min_bytes)
    except BaseException:
        os.close(read_only)
        raise
    os.close(fd)
    return read_only


def check_sealed(opened: int, name: str, min_bytes: int) -> None:
    """The checks an importer makes on a descriptor it holds (opened through /proc or received by
    SCM_RIGHTS, fdchannel.py): our memfd ``lora-ipc.<name>``, owned by this user, sealed, large enough."""
    expected = f"/memfd:{MEMFD_PREFIX}{name} (deleted)"
    try:
        target = os.readlink(f"/proc/self/fd/{opened}")
    except OSError as exc:
        raise BackendError(f"cannot inspect the descriptor of shared memory {name!r}: {exc}") from None
    # what we hold, read back from our own descriptor (a recycled pid cannot fool this)
    if target != expected:
        raise BackendError(f"descriptor {target[:200]!r} is not lora-ipc shared memory {name!r}")
    try:
        st = os.fstat(opened)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise BackendError(f"shared memory {name!r} is not owned by this user (uid {st.st_uid})")
        seals = fcntl.fcntl(opened, fcntl.F_GET_SEALS)
        if seals & SEALS != SEALS:
            raise BackendError(f"shared memory {name!r} is not sealed against resizing")
        if st.st_size < min_bytes:
            raise BackendError(f"shared memory {name!r} has {st.st_size} bytes, the handle says {min_bytes}")
        if st.st_blocks * 512 < st.st_size:
            raise BackendError(
                f"shared memory {name!r} is not reserved ({st.st_blocks * 512} of {st.st_size} "
                "bytes allocated): its reader would pay for the exporter's pages"
            )
    except OSError as exc:
        raise BackendError(f"cannot check shared memory {name!r}: {exc}") from None


READ_CHUNK = 1 << 30  # a single read(2) returns at most ~2 GiB
# reads this large are split across threads (pread releases the GIL). A fetch reads into a recycled, warm
# buffer (host_buffers.py): at 20 MB one thread was as fast or faster on a busy 2-core machine (the hand-off
# costs what it saves), at 80 MB two threads took 66 ms p50 against one thread's 90 ms
PARALLEL_READ_BYTES = 48 << 20
_read_pool: ThreadPoolExecutor | None = None
_read_pool_lock = threading.Lock()


def _read_range(fd: int, dst: memoryview, offset: int) -> None:
    done = 0
    while done < len(dst):
        try:
            n = os.preadv(fd, [dst[done : done + READ_CHUNK]], offset + done)
        except OSError as exc:
            raise BackendError(f"cannot read shared memory: {exc}") from None
        if n <= 0:
            raise BackendError(f"shared memory ended after {offset + done} bytes; {len(dst) - done} more expected")
        done += n


def read_exact(fd: int, dst: memoryview, offset: int) -> None:
    """Fill ``dst`` (a writable byte view) from ``fd`` at ``offset`` with ``pread``; a short file is a BackendError.

    A large read is split across a few threads: most of its time goes to faulting in ``dst``'s fresh pages
    (the kernel's copy into newly allocated memory), which parallelises; measured on 2 cores for 80 MiB
    into a fresh buffer, 53 ms on one thread, 31 ms on two."""
    parts = min(4, os.cpu_count() or 1)
    if len(dst) < PARALLEL_READ_BYTES or parts < 2:
        _read_range(fd, dst, offset)
        return
    global _read_pool
    with _read_pool_lock:
        if _read_pool is None:
            _read_pool = ThreadPoolExecutor(parts, thread_name_prefix="lora-ipc-read")
    step = -(-len(dst) // parts)
    futures = [
        _read_pool.submit(_read_range, fd, dst[start : start + step], offset + start)
        for start in range(0, len(dst), step)
    ]
    for future in futures:
        future.result()  # the first failure (BackendError) is raised once every part has finished


def memfds_of(pid: int) -> dict[str, str]:
    """The lora-ipc memfds (slabs and generation tables) process ``pid`` holds, for leak checks and
    status: ``{memfd name as /proc shows it: a /proc/<pid>/fd/<fd> path to it}``, one entry per memfd
    however many descriptors point at it (Python's mmap holds a dup). Empty once the process is gone."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(f"/memfd:{MEMFD_PREFIX}"):
                    found.setdefault(target, f"/proc/{pid}/fd/{fd}")
    return found


# --------------------------------------------------------------------------------------------
# generation counters: how an importer learns that a slab was reused under its copy
# --------------------------------------------------------------------------------------------


class GenerationTable:
    """Exporter side: one 8-byte reuse counter per slab in a sealed memfd (``slots`` counters; the layout is
    ``lora_ipc.core.protocol.tables``'s).

    The store bumps a slab's counter *before* it writes a new version into the slab, and a fetch
    reply carries the counter's value for the version it leases. The importer reads the counter
    again after its copy is complete: unchanged means no new write had started when the copy ended.
    """

    def __init__(self, slots: int = GENERATION_SLOTS):
        self.slots = slots
        self.name = generation_table_name(os.getpid(), os.urandom(4))
        self.fd = create_sealed(self.name, generation_table_bytes(slots))
        # native int64 ("q"): GENERATION_COUNTER's little-endian on every machine lora_ipc runs on (x86-64, aarch64)
        self._counters = memoryview(mmap.mmap(self.fd, generation_table_bytes(slots))).cast("q")
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    def take_slot(self) -> int:
        with self._lock:
            if not self._free:
                raise BackendError(f"all {self.slots} slab generation counters are in use")
            return self._free.pop()

    def free_slot(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def bump(self, slot: int) -> int:
        self._counters[slot] += 1
        return self._counters[slot]

    def read(self, slot: int) -> int:
        return self._counters[slot]

    def close(self) -> None:
        os.close(self.fd)  # the mapping stays valid until the memoryview is collected


class GenerationReader:
    """Importer side: reads counters of one exporter's table with ``pread`` (no mapping at all)."""

    def __init__(self, pid: int, fd: int, table_name: str, received: int | None = None):
        if received is None:
            self.fd = open_sealed(pid, fd, table_name, GENERATION_COUNTER.size)
        else:  # a descriptor that came by SCM_RIGHTS (fdchannel.py); this reader owns it once checked
            try:
                check_sealed(received, table_name, GENERATION_COUNTER.size)
            except BaseException:
                os.close(received)
                raise
            self.fd = received
        self.nbytes = os.fstat(self.fd).st_size

    def read(self, slot: int) -> int:
        at = generation_offset(slot)
        if at + GENERATION_COUNTER.size > self.nbytes:
            raise BackendError(f"generation slot {slot} lies outside the exporter's table")
        return GENERATION_COUNTER.unpack(os.pread(self.fd, GENERATION_COUNTER.size, at))[0]

    def close(self) -> None:
        os.close(self.fd)


MAX_GENERATION_READERS = 16
_readers: BoundedLRU[tuple[int, int, str], GenerationReader] = BoundedLRU(
    MAX_GENERATION_READERS, lambda _, reader: reader.close()
)
_readers_lock = threading.Lock()


def generation_reader(pid: int, fd: int, table: str) -> GenerationReader:
    """One reader per exporter table per process (bounded; the least recently used is closed). Keyed by
    the table's name too: a closed store's fd number comes back for the next store's table."""
    if not table.startswith(GENERATION_PREFIX):
        raise BackendError(f"{table!r} is not a lora-ipc generation table")
    key = (pid, fd, table)
    with _readers_lock:
        reader = _readers.get(key)
        if reader is not None:
            return reader
    reader = GenerationReader(pid, fd, table)  # checks the opened memfd's name is this table's
    with _readers_lock:
        return _readers.put(key, reader)
