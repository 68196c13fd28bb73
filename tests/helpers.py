"""Helpers shared by the test modules (fixtures live in conftest.py)."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import pytest
import torch

from lora_ipc.core.memory.shm import memfds_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout_env(**extra: str) -> dict[str, str]:
    """This environment with this checkout first on PYTHONPATH (so a child process, and vLLM's worker
    processes under it, import this lora_ipc and ``tests``), plus ``extra``."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_in_checkout(cmd, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``cmd`` run to its end in this checkout's root with :func:`checkout_env` (or ``env``), its output
    captured as text; the caller checks its return code."""
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=ROOT,
        env=checkout_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


#: a token for handles given to ``open_slab`` directly (with :func:`delivered`)
TOKEN = b"t" * 16


def delivered(*fds: int) -> Callable[..., list[int]]:
    """A ``receive`` for ``open_slab``: hands over duplicates of ``fds`` by ``SCM_RIGHTS`` over a socket pair,
    as the descriptor channel delivers them (the importer owns what it receives, the caller keeps ``fds``)."""

    def receive(token: bytes, **_) -> list[int]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b:
            socket.send_fds(a, [b"K"], list(fds))
            _, got, _, _ = socket.recv_fds(b, 16, len(fds))
        return got

    return receive


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


def memfd_fds(pid: int) -> int:
    """Descriptors of ``pid`` open on lora_ipc memfds (others in the process — a finalizer closing an earlier
    test's socket — do not move the count)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:lora-ipc")
        except OSError:  # closed meanwhile
            pass
    return count


def shm_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "/memfd:lora-ipc." in line)


def shm_fds(pid: int) -> list[str]:
    """/proc paths of the lora-ipc memfds (slabs and generation tables) process ``pid`` holds, one per memfd."""
    return list(memfds_of(pid).values())


def shm_files(*pids: int) -> list[str]:
    """lora-ipc files in /dev/shm: there must never be any (slabs are memfds, see lora_ipc/core/memory/shm.py).

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


def publish_fetch_cycles(exporter, client, cycles: int, name: str = "soak"):
    """``cycles`` rounds of: the exporter process publishes random adapter ``i % 5`` as ``name``, the client
    fetches it (the version just published). Returns the last adapter fetched."""
    adapter = None
    for i in range(cycles):
        version = exporter.call("publish_random", name, i % 5)
        adapter = client.fetch(name)
        assert adapter.version == version
    return adapter


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


def private_netns_unavailable() -> str | None:
    """Why a private network namespace with only loopback (``unshare -n``, where Ray tests and benchmarks run)
    cannot be made here, or None when it can."""
    import shutil

    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2) to run Ray in a private network namespace"
    probe = subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return f"cannot make a private network namespace here (unshare -n: {probe.stderr.strip()[:200]})"
    return None


def skip_unless_loopback_only(runner: str) -> None:
    """Skip the calling module unless this process's network namespace has nothing but ``lo``: Ray must
    only ever bind loopback, so its suites run only where ``runner`` starts them (``unshare -n``)."""
    if [name for _, name in socket.if_nameindex()] != ["lo"]:
        pytest.skip(
            f"Ray tests run only in a private network namespace with nothing but loopback "
            f"({runner} starts them with unshare -n)",
            allow_module_level=True,
        )


@contextlib.contextmanager
def running(cmd, ready: Callable[[], bool], what: str, timeout: float = 120, stop=None, **popen):
    """``cmd`` in a subprocess (stdout and stderr together in one text pipe) for the ``with`` block,
    entered once ``ready()`` holds: the process must stay alive until then, within ``timeout`` seconds.
    On the way out ``stop(proc)`` (default: terminate), a 30 s wait, then a kill if it is still there."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"{what} exited: {proc.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.1)
        yield proc
    finally:
        (stop or subprocess.Popen.terminate)(proc)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def cuda_round_trip(exporter, tmp_path, name: str, dtype: str):
    """``exporter`` (a CUDA ExporterProcess) publishes a real PEFT adapter in ``dtype`` and saves it in
    ``tmp_path``; a client fetches it onto the GPU, bitwise the saved one, twice: scaling the first copy in
    place must not reach the exporter. Yields that client for the caller's own checks."""
    from safetensors.torch import load_file

    from lora_ipc import AdapterClient

    exporter.call("publish_peft", name, dtype, 3, str(tmp_path))
    reference = load_file(tmp_path / "adapter_model.safetensors")
    with AdapterClient(exporter.endpoint) as client:
        adapter = client.fetch(name)
        assert all(t.is_cuda for t in adapter.tensors.values())
        assert_same_adapter(adapter.tensors, reference)
        for t in adapter.tensors.values():  # owned copies: writing them cannot reach the exporter
            t.mul_(0)
        assert_same_adapter(client.fetch(name).tensors, reference)
        yield client


def private_endpoint(name: str) -> str:
    """An ``ipc://`` endpoint in a fresh private directory of its own."""
    return f"ipc://{tempfile.mkdtemp(prefix='lora-ipc-ident-')}/{name}.sock"


SERVED = ("good", 7)  # what the ``served`` fixture publishes: the name and the seed of models.random_adapter


def still_serving(exporter_proc) -> None:
    """The exporter of the ``served`` fixture still serves its adapter, bitwise."""
    from lora_ipc import AdapterClient

    from . import models

    with AdapterClient(exporter_proc.endpoint, timeout_s=5) as client:
        assert_same_adapter(client.fetch(SERVED[0]).tensors, models.random_adapter(SERVED[1]))
