"""The native extension (csrc/vmm.c) without a GPU: built from the checkout, it reports a missing driver
once and cleanly, and it runs its real VMM code paths against a host-memory stand-in for libcuda
(tests/native/fake_cuda.c, compiled here): create + export + import round trip, read-only imports
that refuse writes (in a child), every failure unwound with nothing leaked."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_SRC = Path(__file__).resolve().parent / "native" / "fake_cuda.c"

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The extension built in place from a copy of the sources (the checkout gets no build/)."""
    src = tmp_path_factory.mktemp("native") / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            "__pycache__", ".git", "build", "*.so", "tests", "benches", "docs", "examples", ".venv"
        ),
    )
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=src,
        check=True,
        timeout=300,
        capture_output=True,
    )
    assert list((src / "lora_ipc").glob("_native*.so")), "the extension did not build"
    return src


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory) -> Path:
    lib = tmp_path_factory.mktemp("fake") / "libfakecuda.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(FAKE_SRC)], check=True, timeout=120)
    return lib


def run_py(built: Path, *code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("LORA_IPC_LIBCUDA", "FAKE_CUDA_INIT_ERROR")}
    full.update(PYTHONPATH=str(built), **env)
    source = "".join(map(textwrap.dedent, code))
    return subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, env=full, timeout=120, cwd=built
    )


LEAKS = """
    def leaks():
        fds = []
        for f in os.listdir("/proc/self/fd"):
            try:
                if "fake-cuda" in os.readlink(f"/proc/self/fd/{f}"):
                    fds.append(f)
            except OSError:
                pass
        maps = [line for line in open("/proc/self/maps") if "fake-cuda" in line]
        return len(fds), len(maps)
"""


def test_missing_driver_is_reported_once_as_a_backend_error(built, tmp_path):
    not_a_driver = tmp_path / "libnotcuda.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(not_a_driver), "-x", "c", "-"], input=b"int x;\n", check=True)
    code = """
        import json, logging
        from lora_ipc.core.memory import native
        from lora_ipc.core.errors import BackendError
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())
        logging.getLogger("lora_ipc.core.memory.native").addHandler(Keep())
        logging.getLogger("lora_ipc.core.memory.native").setLevel(logging.INFO)
        errors = []
        for _ in range(3):
            try:
                native.vmm()
            except BackendError as exc:
                errors.append(str(exc))
        print(json.dumps({"ext": native.extension().__file__, "status": native.status(), "errors": errors,
                          "log": records}))
    """
    for env, expected in (
        ({"LORA_IPC_LIBCUDA": "/nonexistent/libcuda.so.1"}, "no CUDA driver: cannot load"),
        ({"LORA_IPC_LIBCUDA": str(not_a_driver)}, "no CUDA driver: " + str(not_a_driver) + " has no cuGetProcAddress"),
    ):
        out = run_py(built, code, **env)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got["ext"].startswith(str(built)), got
        assert got["status"][0] is False and got["status"][1].startswith(expected), got
        assert len(got["errors"]) == 3 and all(e.startswith("CUDA VMM unavailable: " + expected) for e in got["errors"])
        assert len(got["log"]) == 1 and expected in got["log"][0], got["log"]  # said once


def test_failing_cuinit_is_reported_by_name(built, fake_driver):
    out = run_py(
        built,
        """
        from lora_ipc.core.memory import native
        print(native.status()[1])
    """,
        LORA_IPC_LIBCUDA=str(fake_driver),
        FAKE_CUDA_INIT_ERROR="100",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no usable CUDA driver: cuInit failed (CUDA_ERROR_NO_DEVICE, 100)"


def test_vmm_round_trip_through_an_exported_descriptor(built, fake_driver):
    out = run_py(
        built,
        LEAKS,
        """
        import ctypes, json, os
        from lora_ipc.core.memory import native
        n = native.vmm()
        before = leaks()
        gran = n.granularity(0)
        info = n.device_info(0)
        size = 2 * gran
        payload = os.urandom(size)
        slab, fd = n.create(0, size)
        assert slab.writable and slab.size == size and slab.device == 0
        ctypes.memmove(slab.ptr, payload, size)
        imported = n.import_fd(fd, size, 0)
        ro = not imported.writable
        same = ctypes.string_at(imported.ptr, size) == payload
        # the exporter lets go first: the importer's mapping keeps the memory
        slab.close(); os.close(fd)
        still = ctypes.string_at(imported.ptr, size) == payload
        imported.close(); imported.close()  # idempotent
        print(json.dumps({"gran": gran, "uuid": info["uuid"].hex(), "ro": ro, "same": same, "still": still,
                          "before": before, "after": leaks(), "ptr": imported.ptr}))
    """,
        LORA_IPC_LIBCUDA=str(fake_driver),
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["gran"] == 2 << 20 and got["uuid"] == "ab" * 16
    assert got["ro"] and got["same"] and got["still"]
    assert got["after"] == got["before"] == [0, 0] and got["ptr"] == 0


def test_a_read_only_import_refuses_writes(built, fake_driver):
    """The importer's mapping is read-only: a write through it kills the writer, never changes the bytes."""
    out = run_py(
        built,
        """
        import ctypes, os, sys
        from lora_ipc.core.memory import native
        n = native.vmm()
        slab, fd = n.create(0, 2 << 20)
        ctypes.memmove(slab.ptr, b"exporter", 8)
        child = os.fork()
        if child == 0:
            imported = n.import_fd(fd, 2 << 20, 0)
            ctypes.memmove(imported.ptr, b"imposter", 8)
            os._exit(0)
        _, status = os.waitpid(child, 0)
        print(os.WIFSIGNALED(status) and os.WTERMSIG(status), ctypes.string_at(slab.ptr, 8).decode())
    """,
        LORA_IPC_LIBCUDA=str(fake_driver),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(int(signal.SIGSEGV)), "exporter"]


def test_failures_are_typed_and_unwound(built, fake_driver, tmp_path):
    """Too large a size, a descriptor that is not a VMM export, a failing cuMemSetAccess: a BackendError each,
    and no address range, allocation or descriptor is left behind."""
    code = (
        LEAKS,
        """
        import json, os
        from lora_ipc.core.memory import native
        from lora_ipc.core.errors import BackendError
        n = native.vmm()
        gran = n.granularity(0)
        slab, fd = n.create(0, gran)
        before = leaks()
        errors = []
        r, w = os.pipe()
        memfd = os.memfd_create("lora-ipc.not-vmm")
        os.ftruncate(memfd, gran)
        cases = [(fd, 2 * gran), (r, gran), (memfd, gran)]
        if os.environ.get("FAKE_CUDA_ACCESS_ERROR"):
            cases = [(fd, gran)]
        for f, size in cases:
            try:
                native.call(n.import_fd, f, size, 0)
                errors.append(None)
            except BackendError as exc:
                errors.append(str(exc))
        try:
            n.import_fd(fd, -1, 0)
        except ValueError as exc:
            errors.append("ValueError")
        print(json.dumps({"errors": errors, "before": before, "after": leaks()}))
    """,
    )
    out = run_py(built, *code, LORA_IPC_LIBCUDA=str(fake_driver))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["errors"][0].startswith("cuMemMap failed")  # larger than the allocation
    assert got["errors"][1].startswith("cuMemImportFromShareableHandle failed")  # a pipe
    assert got["errors"][2].startswith("cuMemImportFromShareableHandle failed")  # a memfd that is no export
    assert got["errors"][3] == "ValueError"
    assert got["after"] == got["before"], got
    out = run_py(built, *code, LORA_IPC_LIBCUDA=str(fake_driver), FAKE_CUDA_ACCESS_ERROR="1")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["errors"][0].startswith("cuMemSetAccess failed")
    assert got["after"] == got["before"], got
