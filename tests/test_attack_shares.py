"""Attacks on what a server shares out (issue 23, items 12-15): no peer can spend another's share.

Same-uid attackers, each a real process: one that squats the descriptor channel's connections, one that
floods it with pushed descriptors, one that forks a child per connection so that every connection looks
like a peer of its own (the guard then shed the legitimate client), and two that send fetches on
throwaway sockets so that their leases, outliving the connections, filled the global cap. Each test failed
on the code before; none asserts a speed.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import select
import socket
import time

import zmq

from lora_ipc import AdapterClient, AdapterExporter, Limits, RemoteExporter
from lora_ipc.core import protocol as p
from lora_ipc.core.channels.fdchannel import MAX_CONNECTIONS, fd_socket_path

from . import models
from .helpers import assert_same_adapter

CTX = mp.get_context("spawn")


def _connect(path: str, kind: int, fork: bool) -> socket.socket:
    """A connection to ``path``; with ``fork``, made by a child that passes it back and exits (so the
    kernel names an exited process as its peer: the fork trick)."""
    if not fork:
        sock = socket.socket(socket.AF_UNIX, kind)
        sock.connect(path)
        return sock
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = os.fork()
    if child == 0:
        try:
            sock = socket.socket(socket.AF_UNIX, kind)
            sock.connect(path)
            socket.send_fds(there, [b"x"], [sock.fileno()])
        finally:
            os._exit(0)
    try:
        _, fds, _, _ = socket.recv_fds(here, 1, 1)
    finally:
        os.waitpid(child, 0)
        here.close()
        there.close()
    if not fds:
        raise OSError("the child could not connect")
    return socket.socket(fileno=fds[0])


def _squatter(path: str, n: int, kind: int, fork: bool, ready) -> None:
    """Hold ``n`` idle connections to ``path``, replacing each one the server closes, until killed."""
    held: dict[int, socket.socket] = {}
    poller = select.poll()
    while True:
        while len(held) < n:
            try:
                sock = _connect(path, kind, fork)
            except OSError:
                time.sleep(0.01)
                continue
            held[sock.fileno()] = sock
            poller.register(sock, select.POLLIN)
        ready.set()
        for fd, _ in poller.poll(50):
            sock = held[fd]
            try:
                data = sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # closed by the server: replaced by a new one
                poller.unregister(fd)
                del held[fd]
                sock.close()


@contextlib.contextmanager
def _processes(target, args_list, timeout: float = 120):
    """One process ``target(*args, ready)`` per args, once each set its event; killed on the way out."""
    procs, events = [], []
    try:
        for args in args_list:
            events.append(CTX.Event())
            procs.append(CTX.Process(target=target, args=(*args, events[-1]), daemon=True))
            procs[-1].start()
        for event in events:
            assert event.wait(timeout), f"{target.__name__} did not get going"
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.join(20)


# ---- item 12: the descriptor channel's connections ----------------------------------------------


def test_a_squatted_descriptor_channel_still_serves_publishes_and_fetches(tmp_path, daemons):
    """A process holding more idle channel connections than the daemon keeps (replacing each one dropped)
    denied every remote publish and every new import (0/5 and 0/10 before, and the client fell back to
    host copies for life). The heaviest peer's oldest connection makes room now."""
    endpoint = f"ipc://{tmp_path}/d.sock"
    daemons(endpoint)
    squat = [(fd_socket_path(endpoint), MAX_CONNECTIONS + 16, socket.SOCK_SEQPACKET, False)]
    with _processes(_squatter, squat):
        with RemoteExporter(endpoint, timeout_s=20) as publisher:
            versions = [
                publisher.publish("a", models.random_adapter(seed), models.RANDOM_ADAPTER_CONFIG) for seed in range(5)
            ]
        assert versions == [1, 2, 3, 4, 5]
        for _ in range(10):
            with AdapterClient(endpoint, timeout_s=20) as client:  # a new import each time: a channel exchange
                assert_same_adapter(client.fetch("a").tensors, models.random_adapter(4))
                assert not client._host_only


# ---- item 13: pushed descriptors ------------------------------------------------------------------


def _pusher(path: str, fork: bool, ready) -> None:
    """Push descriptors (one of our own memfds each time) as fast as the daemon takes them, until killed;
    ``ready`` once the daemon has taken more than this process's share of them (the flood is under way)."""
    from lora_ipc.core.channels.fdchannel import PUSHED_PER_PROCESS
    from lora_ipc.core.protocol.descriptors import PUSH, ok_reply

    fd = os.memfd_create("lora-ipc.x", os.MFD_CLOEXEC)
    taken = 0
    while True:
        with contextlib.suppress(OSError):
            sock = _connect(path, socket.SOCK_SEQPACKET, fork)
            with sock:
                socket.send_fds(sock, [PUSH + os.urandom(16)], [fd])
                taken += sock.recv(512) == ok_reply(0)
        if taken > PUSHED_PER_PROCESS:
            ready.set()


def test_pushes_of_other_processes_never_evict_a_trainers_push(tmp_path, daemons):
    """Three processes push descriptors they never publish, as fast as they can (one of them through
    exited children); a trainer's 30 remote publishes all succeed (before: its push was evicted from the
    16-entry table, oldest first, and publish failed with "no descriptor was pushed with this token")."""
    endpoint = f"ipc://{tmp_path}/d.sock"
    daemons(endpoint)
    path = fd_socket_path(endpoint)
    with _processes(_pusher, [(path, False), (path, False), (path, True)]):  # each flooding when it returns
        with RemoteExporter(endpoint, timeout_s=20) as publisher:
            for seed in range(30):
                publisher.publish("a", models.random_adapter(seed), models.RANDOM_ADAPTER_CONFIG)
        with AdapterClient(endpoint, timeout_s=20) as client:
            assert_same_adapter(client.fetch("a").tensors, models.random_adapter(29))


# ---- item 14: the guard's connection slots ---------------------------------------------------------

GUARD_CAP = 32


def _small_exporter(endpoint: str, ready) -> None:
    from lora_ipc.core.channels import guard

    guard.connection_cap = lambda *a, **k: GUARD_CAP  # the flood passes it without a thousand descriptors
    with AdapterExporter(endpoint) as exporter:
        exporter.publish("policy", models.random_adapter(7), models.RANDOM_ADAPTER_CONFIG)
        ready.set()
        time.sleep(600)


def test_a_forking_flood_cannot_make_the_guard_shed_a_legitimate_client(tmp_path):
    """The attacker forks a child per connection (it connects, passes the socket back, exits) and holds
    three times the cap, replacing every connection the guard drops. A legitimate process with two
    connections asking all along is never dropped (before: each child was a "peer" of one connection,
    the client with two was "the heaviest" and was dropped again and again)."""
    endpoint = f"ipc://{tmp_path}/e.sock"
    with _processes(_small_exporter, [(endpoint,)]):
        ctx = zmq.Context()
        socks, monitors = [], []
        try:
            for _ in range(2):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                monitors.append(sock.get_monitor_socket(zmq.EVENT_DISCONNECTED))
                sock.connect(endpoint)
                socks.append(sock)
            asked = 0

            def ask_all() -> None:
                nonlocal asked
                for sock in socks:
                    asked += 1
                    sock.send_multipart([b"", p.encode(p.StatusRequest(), asked)])
                    if sock.poll(5000):  # a reply lost with a dropped connection shows as a disconnect below
                        sock.recv_multipart()

            ask_all()  # a client that has been asking all along
            flood = [(str(tmp_path / "e.sock"), 3 * GUARD_CAP, socket.SOCK_STREAM, True)]
            with _processes(_squatter, flood):
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    ask_all()
                with AdapterClient(endpoint, timeout_s=30) as client:
                    dropped = client.status().server.dropped_connections
            disconnects = 0
            for monitor in monitors:
                while monitor.poll(0):
                    monitor.recv_multipart()
                    disconnects += 1
            assert dropped > 0, "the flood never reached the cap: the test proves nothing"
            assert disconnects == 0, f"the legitimate client was dropped {disconnects} times ({dropped} drops in all)"
        finally:
            for sock in socks + monitors:
                sock.close(0)
            ctx.term()


# ---- item 15: the global lease cap -------------------------------------------------------------------

MAX_LEASES = 256


def _throwaway_fetcher(endpoint: str, ready) -> None:
    """Open a socket, send 64 fetches, never read a reply, close it; again, until killed."""
    ctx = zmq.Context()
    sent = 0
    while True:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 200)  # the fetches leave before the socket goes
        sock.connect(endpoint)
        for i in range(64):
            sock.send_multipart([b"", p.encode(p.FetchRequest("policy", None, "flood"), i + 1)])
        sock.close()
        sent += 1
        if sent == 8:  # 2 x 8 x 64 leases: eight times the cap, had they outlived their sockets
            ready.set()


def test_throwaway_fetches_cannot_fill_the_lease_cap(tmp_path):
    """Two processes send fetches they never read on sockets they close at once. Legitimate fetches all
    succeed (before: 6-10 of 10 failed with LimitExceeded, the cap full of leases of closed sockets)."""
    limits = Limits(max_leases=MAX_LEASES)
    with AdapterExporter(f"ipc://{tmp_path}/e.sock", limits=limits) as exporter:
        tensors = models.random_adapter(7)
        exporter.publish("policy", tensors, models.RANDOM_ADAPTER_CONFIG)
        with _processes(_throwaway_fetcher, [(exporter.endpoint,), (exporter.endpoint,)]):
            for _ in range(10):
                with AdapterClient(exporter.endpoint, timeout_s=20) as client:
                    assert_same_adapter(client.fetch("policy").tensors, tensors)
        assert exporter.store.leases_dropped_with_connection > 0
