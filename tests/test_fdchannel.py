"""CPU slabs travel as descriptors (SCM_RIGHTS) over the channel beside each server's ZeroMQ socket
(lora_ipc/core/channels/fdchannel.py), the only way any descriptor reaches an importer: across pid
namespaces, with one-time tokens, and against hostile peers on either side (replayed or guessed tokens,
descriptors sent unasked, descriptors of the wrong kind, size or name, a peer of another uid, a receiver
out of descriptors): a typed error each, nothing leaked."""

import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from lora_ipc import AdapterClient, AdapterExporter
from lora_ipc.core.channels.fdchannel import FdReceiver, FdServer, fd_socket_path
from lora_ipc.core.errors import BackendError, EndpointNotTrusted
from lora_ipc.core.memory import shm
from lora_ipc.core.protocol import CpuSlabHandle
from lora_ipc.core.protocol.descriptors import FETCH as REQUEST

from . import models
from .helpers import assert_same_adapter, checkout_env, open_fds, run_in_checkout, running
from .procs import ExporterProcess

ROOT = Path(__file__).resolve().parent.parent


def own_fds() -> set[str]:
    """This process's open descriptors (without the one listdir itself held while it listed)."""
    return {fd for fd in os.listdir("/proc/self/fd") if os.path.lexists(f"/proc/self/fd/{fd}")}


def pid_namespace_command() -> list[str]:
    """The command prefix that runs a process in a new pid namespace with its own /proc (skips where denied)."""
    ns = ["unshare", "-p", "--fork", "--kill-child", "--mount-proc"]  # the namespace dies with unshare
    probe = subprocess.run([*ns, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create pid namespaces here: {probe.stderr.strip()[:200]}")
    return ns


def run_child(script: str, arg: str, timeout: float, prefix: tuple[str, ...] = ()) -> dict:
    """Run ``script`` (python -c) with ``arg`` in a child process (under ``prefix``, e.g. a pid namespace):
    it must exit 0; returns the JSON object it printed last."""
    out = run_in_checkout([*prefix, sys.executable, "-c", script, arg], timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_no_new_fds(before: set[str], within_s: float = 5.0) -> None:
    """No descriptor beyond ``before`` stays open: an in-process server thread closes the connection it
    accepted for a request shortly after the requester returns, so wait for it (up to ``within_s``)."""
    deadline = time.monotonic() + within_s
    while own_fds() - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not own_fds() - before


def test_cpu_slabs_arrive_by_the_descriptor_channel_with_one_time_tokens(tmp_path, monkeypatch):
    endpoint = f"ipc://{tmp_path}/e.sock"
    tokens = []
    original = FdReceiver.__call__

    def recording(self, token, **kw):
        tokens.append(token)
        return original(self, token, **kw)

    monkeypatch.setattr(FdReceiver, "__call__", recording)
    with AdapterExporter(endpoint) as exporter:
        assert stat.S_IMODE(os.stat(fd_socket_path(endpoint)).st_mode) == 0o600
        tensors = models.random_adapter(1)
        exporter.publish("a", tensors, models.RANDOM_ADAPTER_CONFIG)
        with AdapterClient(endpoint) as client:
            assert_same_adapter(client.fetch("a").tensors, tensors)
            assert_same_adapter(client.fetch("a").tensors, tensors)  # kept mapping: no second token
        assert len(tokens) == 1
        before = own_fds()
        with pytest.raises(BackendError, match="unknown, expired or already used"):
            FdReceiver(endpoint)(tokens[0])  # replayed
        with pytest.raises(BackendError, match="unknown, expired or already used"):
            FdReceiver(endpoint)(os.urandom(16))  # guessed
        assert_no_new_fds(before)
    assert not os.path.exists(fd_socket_path(endpoint))


def test_a_channel_served_by_another_process_than_the_zmq_server_is_refused(tmp_path, monkeypatch):
    """The descriptor must come from the process the kernel reports for the ZeroMQ reply (imports.py)."""
    endpoint = f"ipc://{tmp_path}/e.sock"
    asked = []
    original = FdReceiver.__call__

    def claiming_another_server(self, token, expected_pid=None, **kw):
        asked.append(expected_pid)
        return original(self, token, expected_pid=os.getpid() + 1, **kw)  # what a channel of another process reports

    monkeypatch.setattr(FdReceiver, "__call__", claiming_another_server)
    with AdapterExporter(endpoint) as exporter:
        exporter.publish("a", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
        before = own_fds()
        with AdapterClient(endpoint) as client, pytest.raises(EndpointNotTrusted, match="descriptor refused"):
            client.fetch("a")
    assert asked == [os.getpid()]  # the in-process exporter's pid, as the kernel reported it for the reply
    assert_no_new_fds(before)


def test_without_a_channel_nothing_is_fetched_or_pushed_and_the_error_says_so(tmp_path):
    """There is no other way for a descriptor (protocol 3 dropped the ``/proc`` fallback): a server whose
    descriptor channel is gone answers fetches the client cannot import, and takes no publish; each is a typed
    ``FdChannelUnavailable`` naming the channel, and the client does not fall back to host copies."""
    from lora_ipc import RemoteExporter
    from lora_ipc.core.channels.fdchannel import ChannelFailed, FdChannelUnavailable

    endpoint = f"ipc://{tmp_path}/e.sock"
    with AdapterExporter(endpoint) as exporter:
        tensors = models.random_adapter(2)
        exporter.publish("a", tensors, models.RANDOM_ADAPTER_CONFIG)
        os.unlink(fd_socket_path(endpoint))  # a server without a descriptor channel
        with AdapterClient(endpoint) as client:
            with pytest.raises(FdChannelUnavailable, match="no descriptor channel at .*e.sock.fd"):
                client.fetch("a")
            assert not client._host_only and client.host_fallbacks == 0
        assert issubclass(FdChannelUnavailable, ChannelFailed)
        with RemoteExporter(endpoint, timeout_s=10) as publisher:
            with pytest.raises(FdChannelUnavailable, match="no descriptor channel"):
                publisher.publish("b", tensors, models.RANDOM_ADAPTER_CONFIG)
        assert exporter.store.summary("b") is None  # nothing reached the server


# ---- hostile clients against the server ---------------------------------------------------------


@pytest.fixture(scope="module")
def exporter_child():
    proc = ExporterProcess(keep=2)
    proc.call("publish_random", "a", 3)
    yield proc
    proc.close()


def _raw(endpoint: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(fd_socket_path(endpoint))
    return sock


def test_descriptors_sent_unasked_are_closed_by_the_server(exporter_child):
    before = open_fds(exporter_child.pid)
    for count in (1, 3, 10):  # 10: more than the server takes; the kernel closes the rest
        pipes = [os.pipe() for _ in range(count)]
        try:
            with _raw(exporter_child.endpoint) as sock:
                socket.send_fds(sock, [REQUEST + os.urandom(16)], [r for r, _ in pipes])
                reply = sock.recv(512)
            assert reply.startswith(b"E") or reply == b"", reply
        finally:
            for r, w in pipes:
                os.close(r)
                os.close(w)
    for junk in (b"", b"F", b"X" * 17, REQUEST + b"t" * 40):
        with _raw(exporter_child.endpoint) as sock:
            sock.send(junk)
            assert sock.recv(512).startswith(b"E")
    silent = _raw(exporter_child.endpoint)  # connects and says nothing: dropped after its deadline
    assert silent.recv(512) == b""
    silent.close()
    with AdapterClient(exporter_child.endpoint) as client:  # still serving
        assert_same_adapter(client.fetch("a").tensors, models.random_adapter(3))
    deadline = time.monotonic() + 5  # the server closes the channel connection of that fetch just after replying
    while open_fds(exporter_child.pid) > before + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open_fds(exporter_child.pid) <= before + 2  # the zmq connection of the client, nothing per attack


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid")
def test_a_peer_of_another_uid_is_refused(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="lora-ipc-uid-"))
    try:
        os.chmod(base, 0o711)
        endpoint = f"ipc://{base}/e.sock"
        server = FdServer(endpoint, {os.getuid()}).start()
        token = server.offer(lambda: [os.open("/dev/null", os.O_RDONLY)])
        os.chmod(server.path, 0o666)  # only the credential check stands in the way now
        child = os.fork()
        if child == 0:
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                FdReceiver(endpoint, {0, 65534})(token)
            except BackendError as exc:
                code = 0 if "descriptor channel" in str(exc) or "malformed" in str(exc) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.WEXITSTATUS(status) == 0
        assert server.refused >= 1
        got = FdReceiver(endpoint)(token)  # the token was not spent by the refused peer
        assert len(got) == 1
        os.close(got[0])
        server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- a hostile server against the importer ------------------------------------------------------


def _memfd(name: str, nbytes: int, seal: bool = True) -> int:
    fd = os.memfd_create(shm.MEMFD_PREFIX + name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    if nbytes:
        os.posix_fallocate(fd, 0, nbytes)  # reserved, as our exporters' are: only the case's own fault remains
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, shm.SEALS)
    return fd


@pytest.mark.parametrize(
    "case,message",
    [
        ("pipe", "is not lora-ipc shared memory"),
        ("other_name", "is not lora-ipc shared memory"),
        ("small", "has 4096 bytes, the handle says"),
        ("unsealed", "not sealed"),
        ("extra", "unasked"),
    ],
)
def test_wrong_descriptors_from_the_exporter_are_refused_and_closed(tmp_path, case, message):
    from lora_ipc.core.backends.cpu import CpuImportedSlab

    endpoint = f"ipc://{tmp_path}/e.sock"
    server = FdServer(endpoint, {os.getuid()}).start()

    def provider():
        if case == "pipe":
            r, w = os.pipe()
            os.close(w)
            return [r]
        if case == "extra":
            return [_memfd("s.1", 1 << 16), _memfd("gen.x", 64)]
        return [
            _memfd(
                {"other_name": "s.2", "small": "s.1", "unsealed": "s.1"}[case],
                4096 if case == "small" else 1 << 16,
                seal=case != "unsealed",
            )
        ]

    try:
        handle = CpuSlabHandle("s.1", 1 << 16, server.offer(provider))
        before = own_fds()
        with pytest.raises(BackendError, match=message):
            CpuImportedSlab(handle, FdReceiver(endpoint))
        deadline = time.monotonic() + 10  # the server thread closes its copies right after sending
        while own_fds() != before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert own_fds() == before
        assert not [line for line in open("/proc/self/maps") if "lora-ipc.s." in line]
    finally:
        server.stop()


def test_an_untrusted_descriptor_socket_is_refused(tmp_path):
    endpoint = f"ipc://{tmp_path}/e.sock"
    Path(fd_socket_path(endpoint)).write_text("not a socket")
    with pytest.raises(EndpointNotTrusted):
        FdReceiver(endpoint)(os.urandom(16))


EXHAUSTED = textwrap.dedent("""
    import json, os, resource, sys
    from lora_ipc.core.errors import BackendError
    from lora_ipc.core.channels.fdchannel import FdReceiver, FdServer
    from tests.helpers import fill_descriptor_holes
    endpoint = f"ipc://{sys.argv[1]}/e.sock"
    ask_r, ask_w = os.pipe()
    tok_r, tok_w = os.pipe()
    child = os.fork()
    if child == 0:  # the server lives in another process: its descriptors are not the receiver's
        os.close(ask_w)
        server = FdServer(endpoint, {os.getuid()}).start()
        while os.read(ask_r, 1):
            os.write(tok_w, server.offer(lambda: [os.open("/dev/null", os.O_RDONLY)]))
        os._exit(0)
    os.close(ask_r)

    def token():
        os.write(ask_w, b"?")
        return os.read(tok_r, 16)

    first = token()  # the server is up
    top, fillers = fill_descriptor_holes()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    results, leaks = [], []
    for room in (0, 1):  # 0: no descriptor for the socket; 1: the socket fits, the received fd does not
        tok = token()
        before = sorted(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1 + room, hard))
        try:
            FdReceiver(endpoint)(tok)
            results.append("no error")
        except BackendError as exc:
            results.append(type(exc).__name__ + ": " + str(exc))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        leaks.append(sorted(set(os.listdir("/proc/self/fd")) - set(before)))
    got = FdReceiver(endpoint)(first)
    os.close(ask_w)
    os.waitpid(child, 0)
    print(json.dumps({"results": results, "leaks": leaks, "after": len(got)}))
""")


def test_a_receiver_out_of_descriptors_gets_a_typed_error(tmp_path):
    got = run_child(EXHAUSTED, str(tmp_path), timeout=120)
    assert got["results"][0].startswith("BackendError: cannot open the descriptor channel"), got
    assert got["results"][1].startswith("BackendError: descriptor not delivered"), got
    assert got["after"] == 1 and got["leaks"] == [[], []], got


SQUEEZED_SERVER = textwrap.dedent("""
    import json, logging, os, resource, sys, threading
    from lora_ipc.core.channels.fdchannel import FdReceiver, FdServer
    from tests.helpers import fill_descriptor_holes
    endpoint = f"ipc://{sys.argv[1]}/e.sock"
    ask_r, ask_w = os.pipe()
    tok_r, tok_w = os.pipe()
    child = os.fork()
    if child == 0:  # the server: out of descriptors while a client waits, then given room again
        os.close(ask_w)
        refused = threading.Event()

        class Refusals(logging.StreamHandler):  # to stderr as before; tells us when an accept failed
            def emit(self, record):
                super().emit(record)
                if "cannot accept" in record.getMessage():
                    refused.set()

        logging.getLogger("lora_ipc.core.channels.fdchannel").addHandler(Refusals())
        server = FdServer(endpoint, {os.getuid()}).start()
        token = server.offer(lambda: [os.open("/dev/null", os.O_RDONLY)])
        top, fillers = fill_descriptor_holes()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
        os.write(tok_w, token)
        os.read(ask_r, 1)  # the client is fetching
        if not refused.wait(60):  # its connection reached the server, whose accept failed with EMFILE
            os.write(tok_w, json.dumps({"refused": "accept never failed"}).encode())
            os._exit(1)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.read(ask_r, 1)
        os.write(tok_w, json.dumps({"refused": server.refused, "alive": server._thread.is_alive()}).encode())
        os._exit(0)
    token = os.read(tok_r, 16)
    got = {}
    def fetch():
        try:
            got["fds"] = len(FdReceiver(endpoint, timeout_s=30)(token))
        except Exception as exc:
            got["error"] = repr(exc)
    t = threading.Thread(target=fetch)
    t.start()
    os.write(ask_w, b"1")
    t.join(60)
    os.write(ask_w, b"2")
    server = json.loads(os.read(tok_r, 4096))
    os.waitpid(child, 0)
    print(json.dumps({**got, **server}))
""")


def test_a_server_out_of_descriptors_recovers(tmp_path):
    out = run_in_checkout([sys.executable, "-c", SQUEEZED_SERVER, tmp_path], timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"fds": 1, "refused": 0, "alive": True}, (got, out.stderr[-2000:])
    assert out.stderr.count("cannot accept ([Errno 24]") == 1 and "accepting again" in out.stderr, out.stderr[-2000:]


# ---- acceptance: exporter and client in two pid namespaces -------------------------------------

EXPORTER = textwrap.dedent("""
    import os, sys, time
    from safetensors.torch import save_file
    from lora_ipc import AdapterExporter
    from tests import models
    out = sys.argv[1]
    exporter = AdapterExporter(f"ipc://{out}/e.sock")
    tensors = models.random_adapter(7)
    exporter.publish("a", tensors, models.RANDOM_ADAPTER_CONFIG)
    save_file(tensors, f"{out}/want.safetensors")
    open(f"{out}/exporter.ready", "w").write(str(os.getpid()))
    while not os.path.exists(f"{out}/client.done"):
        time.sleep(0.05)
    exporter.close()
""")

CLIENT = textwrap.dedent("""
    import json, os, sys
    from safetensors.torch import load_file
    from lora_ipc import AdapterClient
    out = sys.argv[1]
    with AdapterClient(f"ipc://{out}/e.sock") as client:
        got = client.fetch("a")
        handle = client._slabs.get(next(iter(client._slabs.keys()))).handle
    want = load_file(f"{out}/want.safetensors")
    equal = set(got.tensors) == set(want) and all(
        got.tensors[k].view(-1).view(torch.uint8).equal(want[k].view(-1).view(torch.uint8)) for k in want)
    visible = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and ("exporter" + ".ready").encode() in open(f"/proc/{p}/cmdline", "rb").read():
                visible.append(int(p))
        except OSError:
            pass
    print(json.dumps({"pid": os.getpid(), "exporters_visible": visible, "equal": equal,
                      "handle_fields": sorted(type(handle).__struct_fields__)}))
""").replace("import json, os, sys", "import json, os, sys\nimport torch")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare")
def test_cpu_slabs_cross_pid_namespaces(tmp_path):
    ns = pid_namespace_command()
    with running(
        [*ns, sys.executable, "-c", EXPORTER, str(tmp_path)],
        (tmp_path / "exporter.ready").exists,
        "exporter",
        stop=lambda _: (tmp_path / "client.done").touch(),  # the exporter closes and exits
        env=checkout_env(),
        cwd=ROOT,
    ):
        got = run_child(CLIENT, str(tmp_path), timeout=120, prefix=tuple(ns))
    exporter_pid = int((tmp_path / "exporter.ready").read_text())
    assert got["equal"], got  # the descriptor came by SCM_RIGHTS: the only way there is
    assert got["pid"] <= 2 and exporter_pid <= 2  # both near pid 1, in namespaces apart
    assert got["exporters_visible"] == [], got  # the exporter is invisible from the client's namespace
    assert got["handle_fields"] == ["generation", "nbytes", "slab_id", "token"], got  # it names no process


# ---- fuzz: random requests, with and without descriptors, never get one out or kill the server ----


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    endpoint = f"ipc://{tmp_path_factory.mktemp('fdfuzz')}/e.sock"
    server = FdServer(endpoint, {os.getuid()}).start()
    yield endpoint, server
    server.stop()


def test_random_requests_never_redeem_anything(fuzzed_server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    endpoint, server = fuzzed_server
    sent_token = server.offer(lambda: [os.open("/dev/null", os.O_RDONLY)])
    before = own_fds()

    @settings(
        max_examples=300 if os.environ.get("LORA_IPC_LONG") != "1" else 5000,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(max_size=64), st.integers(0, 3))
    def one(request, with_fds):
        pipes = [os.pipe() for _ in range(with_fds)]
        try:
            with _raw(endpoint) as sock:
                if pipes:
                    socket.send_fds(sock, [request or b"x"], [r for r, _ in pipes])
                else:
                    sock.send(request)
                data, fds, _, _ = socket.recv_fds(sock, 512, 4)
            for fd in fds:
                os.close(fd)
            assert not fds and (data == b"" or data.startswith(b"E")), (request, data, fds)
        finally:
            for r, w in pipes:
                os.close(r)
                os.close(w)

    one()
    deadline = time.monotonic() + 10
    while own_fds() - before and time.monotonic() < deadline:  # the server closes what it got, in its thread
        time.sleep(0.01)
    assert_no_new_fds(before)
    assert server._thread.is_alive()
    got = FdReceiver(endpoint)(sent_token)  # still serving, the real token untouched
    assert len(got) == 1
    os.close(got[0])


# ---- the publish direction: a RemoteExporter pushes its staging slab to a daemon ----------------


def test_a_publisher_pushes_its_staging_slab_to_the_daemons_channel(tmp_path):
    from lora_ipc import RemoteExporter
    from lora_ipc.core.serving.server import TensorSetServer
    from lora_ipc.core.serving.store import TensorSetStore

    endpoint = f"ipc://{tmp_path}/d.sock"
    server = TensorSetServer(TensorSetStore(), endpoint).start()
    try:
        with RemoteExporter(endpoint) as publisher:
            for seed in (1, 2):  # the second publish reuses the staging slab: its pushed fd is closed unused
                publisher.publish("p", models.random_adapter(seed), models.RANDOM_ADAPTER_CONFIG)
        with AdapterClient(endpoint) as client:
            assert_same_adapter(client.fetch("p").tensors, models.random_adapter(2))
        assert not server._fds._pushed  # every pushed descriptor taken or closed
    finally:
        server.stop()


def test_pushes_are_bounded_single_use_and_one_descriptor_each(tmp_path):
    from lora_ipc.core.channels.fdchannel import PUSHED_PER_PROCESS, push_fd
    from lora_ipc.core.protocol.descriptors import PUSH

    endpoint = f"ipc://{tmp_path}/e.sock"
    server = FdServer(endpoint, {os.getuid()}).start()
    try:
        r, w = os.pipe()
        tokens = [push_fd(endpoint, r) for _ in range(PUSHED_PER_PROCESS + 5)]
        deadline = time.monotonic() + 10
        while len(server._pushed) != PUSHED_PER_PROCESS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(server._pushed) == PUSHED_PER_PROCESS  # this process's oldest were closed
        with pytest.raises(BackendError, match="no descriptor was pushed"):
            server.take_pushed(tokens[0])
        [fd] = server.take_pushed(tokens[-1])
        os.close(fd)
        with pytest.raises(BackendError, match="no descriptor was pushed"):
            server.take_pushed(tokens[-1])  # once
        with _raw(endpoint) as sock:  # a push with two descriptors is descriptors sent unasked
            socket.send_fds(sock, [PUSH + os.urandom(16)], [r, w])
            assert sock.recv(512).startswith(b"E")
        os.close(r)
        os.close(w)
    finally:
        server.stop()
    assert not server._pushed


PUBLISH_AND_FETCH = textwrap.dedent("""
    import json, sys
    from lora_ipc import AdapterClient, RemoteExporter
    from tests import models
    endpoint = sys.argv[1]
    tensors = models.random_adapter(11)
    with RemoteExporter(endpoint) as publisher:
        version = publisher.publish("a", tensors, models.RANDOM_ADAPTER_CONFIG)
    with AdapterClient(endpoint) as client:
        got = client.fetch("a")
    equal = set(got.tensors) == set(tensors) and all(got.tensors[k].equal(tensors[k]) for k in tensors)
    print(json.dumps({"version": version, "equal": equal}))
""")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare")
def test_a_daemon_in_another_pid_namespace_takes_publishes_and_serves_fetches(tmp_path):
    ns = pid_namespace_command()
    endpoint = f"ipc://{tmp_path}/d.sock"
    with running(
        [*ns, sys.executable, "-m", "lora_ipc", "serve", "--endpoint", endpoint],
        lambda: os.path.exists(fd_socket_path(endpoint)),
        "daemon",
        env=checkout_env(),
        cwd=ROOT,
    ):
        assert run_child(PUBLISH_AND_FETCH, endpoint, timeout=180, prefix=tuple(ns)) == {"version": 1, "equal": True}


def test_a_slab_freed_before_its_descriptor_is_taken_is_fetched_again_not_a_failed_import(monkeypatch):
    """Churn: between a fetch reply and the client's redeeming its token, the store may free the slab (its
    version evicted, the lease revoked). The channel says so (``G``), the client fetches again; before, it
    took this for a broken import and fell back to host-staged copies for the rest of its life."""
    from lora_ipc.core.channels.fdchannel import SlabGone
    from lora_ipc.core.errors import SlabRecycled

    with AdapterExporter() as exporter:
        exporter.publish("a", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
        tokens = exporter._server._fds.tokens
        real_redeem, freed = tokens.redeem, []

        def gone():
            raise SlabGone("shared memory 'x' is gone")

        def redeem_after_the_slab_was_freed(token):
            provider = real_redeem(token)  # spent either way
            if not freed:
                freed.append(token)
                return gone
            return provider

        monkeypatch.setattr(tokens, "redeem", redeem_after_the_slab_was_freed)
        with pytest.raises(SlabRecycled, match="freed before its descriptor was taken"):
            server = exporter._server._fds
            FdReceiver(exporter.endpoint)(server.offer(lambda: [os.open("/dev/null", os.O_RDONLY)]))
        freed.clear()
        with AdapterClient(exporter.endpoint, timeout_s=10) as client:
            got = client.fetch("a")
            assert freed, "the first import did not meet a freed slab"
            assert_same_adapter(got.tensors, models.random_adapter(1))
            assert not client._host_only and client.host_fallbacks == 0
