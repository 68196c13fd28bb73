"""Helpers shared by the test modules (fixtures live in conftest.py)."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from lora_ipc.shm import memfds_of


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
        b.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
    )


def assert_same_adapter(got: dict, want: dict) -> None:
    assert list(got) == list(want) or set(got) == set(want), (sorted(set(got) ^ set(want)))[:5]
    for k in want:
        assert bitwise_equal(got[k], want[k]), k


def fill_descriptor_holes() -> tuple[int, list[int]]:
    """Open /dev/null into every free descriptor number below this process's highest one, so the next
    descriptor it gets is ``top + 1``; returns ``top`` and the fillers (a limit of ``top + 1 + k`` then leaves
    exactly ``k`` descriptors free). Used by child processes of the out-of-descriptors tests."""
    top = max(int(f) for f in os.listdir("/proc/self/fd"))
    fillers = []
    while True:
        fd = os.open("/dev/null", os.O_RDONLY)
        if fd > top:
            os.close(fd)
            return top, fillers
        fillers.append(fd)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def shm_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "/memfd:lora-ipc." in line)


def shm_fds(pid: int) -> list[str]:
    """/proc paths of the lora-ipc memfds (slabs and generation tables) process ``pid`` holds, one per memfd."""
    return list(memfds_of(pid).values())


def shm_files(*pids: int) -> list[str]:
    """lora-ipc files in /dev/shm: there must never be any (slabs are memfds, see lora_ipc/shm.py).

    With ``pids``: files named after those processes. Without: files of processes this test run
    started, or of no live process (files of another live lora_ipc on the machine are not ours)."""
    out = []
    for name in os.listdir("/dev/shm"):
        if name.startswith("lora-ipc"):
            pid = name.split(".")[1] if name.count(".") >= 2 else ""
            if pids:
                if pid.isdigit() and int(pid) in pids:
                    out.append(name)
                continue
            alive = pid.isdigit() and os.path.exists(f"/proc/{pid}")
            if not alive or _started_by_us(int(pid)):
                out.append(name)
    return out


def _started_by_us(pid: int) -> bool:
    """Whether ``pid`` descends from this test process."""
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def footprint(exporter_pid: int) -> dict:
    """What must stay flat in a steady publish/fetch loop: the exporter's shared memory and fds,
    and this (client) process's fds and shared-memory mappings."""
    files = shm_fds(exporter_pid)
    me = os.getpid()
    return {
        "exporter_shm_files": len(files),
        "exporter_shm_bytes": sum(os.stat(path).st_size for path in files),
        "exporter_fds": open_fds(exporter_pid),
        "client_fds": open_fds(me),
        "client_shm_mappings": shm_mappings(me),
    }


def cli(*args, timeout=60):
    """``python -m lora_ipc ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "lora_ipc", *args], capture_output=True, text=True, timeout=timeout)


def start_daemon(endpoint, *extra):
    """``lora-ipc serve --endpoint ENDPOINT EXTRA...`` in a subprocess, once it says it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_ipc", "serve", "--endpoint", endpoint, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert "serving on" in line, line + proc.stderr.read()
    return proc


def skip_unless_loopback_only(runner: str) -> None:
    """Skip the calling module unless this process's network namespace has nothing but ``lo``: Ray must
    only ever bind loopback, so its suites run only where ``runner`` starts them (``unshare -n``)."""
    if [name for _, name in socket.if_nameindex()] != ["lo"]:
        pytest.skip(
            f"Ray tests run only in a private network namespace with nothing but loopback "
            f"({runner} starts them with unshare -n)",
            allow_module_level=True,
        )
