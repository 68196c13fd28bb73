"""Attacks on the caps (security.md, *Caps*, and the leases of *No torn adapters*): what a peer (hostile or
merely slow) or a publisher can make a process hold. Leases are bound to the connection that took them,
with ids nobody can guess; leases per connection, slabs pinned by leases, adapter names, slab bytes and
shared clients are capped, and a refusal changes nothing and leaves nothing behind.

Connection floods are in test_attack_connections.py; leases outliving throwaway connections in
test_attack_shares.py; hostile frames in test_attack_frames.py.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import zmq

from lora_ipc import LimitExceeded, Limits
from lora_ipc.core import protocol as p
from lora_ipc.core.serving.store import TensorSetStore

from . import models
from .helpers import memfd_fds, open_fds, shm_fds
from .procs import ExporterProcess

# ---- leases: bound to their connection, unguessable, capped ------------------------------------------


def test_leases_are_bound_to_their_connection_and_unguessable():
    exporter = ExporterProcess(keep=2)
    try:
        exporter.call("publish_random", "a", 1)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(exporter.endpoint)
        ids = []
        for i in range(5):
            sock.send_multipart([b"", p.encode(p.FetchRequest("a", None, "holder"), i + 1)])
            assert sock.poll(5000)
            ids.append(p.decode(sock.recv_multipart()[-1]).message.lease_id)
        assert all(abs(a - b) > 1000 for a, b in zip(ids, ids[1:]))  # random, not sequential
        other = zmq.Context.instance().socket(zmq.DEALER)
        other.connect(exporter.endpoint)
        other.send_multipart([b"", p.encode(p.ReleaseRequest(ids[0]), 9)])
        assert other.poll(5000)
        reply = p.decode(other.recv_multipart()[-1]).message
        assert isinstance(reply, p.ErrorReply) and reply.error == "LeaseError"
        assert exporter.call("status").lease_count == 5  # nobody else dropped them
        sock.send_multipart([b"", p.encode(p.ReleaseRequest(ids[0]), 10)])
        assert sock.poll(5000) and isinstance(p.decode(sock.recv_multipart()[-1]).message, p.ReleaseReply)
        sock.close(0)
        other.close(0)
    finally:
        exporter.close()


def test_leases_per_connection_are_capped_and_expiry_does_not_scan():
    store = TensorSetStore(limits=Limits(max_leases_per_holder=8))
    store.publish("a", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
    for _ in range(8):
        store.lease("a", None, b"greedy")
    with pytest.raises(LimitExceeded, match="max_leases_per_holder"):
        store.lease("a", None, b"greedy")
    store.lease("a", None, b"polite")  # others are unaffected

    class NoScan(dict):
        def values(self):
            raise AssertionError("expiry scanned every lease")

    store._leases = NoScan(store._leases)
    for _ in range(1000):
        store.expire_leases()
    assert store.lease_count() == 9
    store.close()


def test_keep_bounds_slabs_even_when_a_client_pins_every_version():
    exporter = ExporterProcess(keep=2)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(exporter.endpoint)
    try:
        for i in range(40):
            exporter.call("publish_random", "pinned", i % 5)
            sock.send_multipart([b"", p.encode(p.FetchRequest("pinned", None, "pinner"), i + 1)])
            assert sock.poll(5000)
            sock.recv_multipart()  # leased, never released
        status = exporter.call("status")
        # keep=2 + max_retiring_per_name=2 pinned + max_free_slabs=2 free
        assert status.slabs.live <= 6, status.slabs
        assert len(shm_fds(exporter.pid)) <= 7  # those slabs + the generation table
        assert status.metrics.leases_revoked >= 30
    finally:
        sock.close(0)
        exporter.close()


# ---- names, slab bytes, shared clients ---------------------------------------------------------------


def test_adapter_names_and_slab_bytes_are_capped_and_failures_leave_nothing():
    store = TensorSetStore(limits=Limits(max_names=20, max_slab_bytes=24 << 20))
    fds = memfd_fds(os.getpid())
    for i in range(20):
        store.publish(f"n{i}", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
    with pytest.raises(LimitExceeded, match="max_names"):
        store.publish("one-too-many", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
    with pytest.raises(LimitExceeded, match="max_slab_bytes"):
        store.publish("n0", {"w": torch.zeros(8 << 20)}, models.RANDOM_ADAPTER_CONFIG)
    assert [v.name for v in store.status().versions][:1] == ["n0"]
    assert store.status().slabs.live == 20
    assert memfd_fds(os.getpid()) - fds == 2 * 20 + 2  # 20 slabs and the generation table (fd + mmap's dup)
    store.close()
    assert memfd_fds(os.getpid()) == fds


def test_shared_clients_are_bounded(tmp_path):
    from lora_ipc.lora.adapters import MAX_SHARED_CLIENTS, _shared, shared_client

    for i in range(MAX_SHARED_CLIENTS):  # the context's own descriptors exist before we count
        shared_client(f"ipc://{tmp_path}/warm-{i}.sock")
    before = open_fds(os.getpid())
    for i in range(100):
        shared_client(f"ipc://{tmp_path}/nobody-{i}.sock")
    assert len(_shared) == MAX_SHARED_CLIENTS
    deadline = time.monotonic() + 10  # closed sockets give their descriptors back on libzmq's reaper thread
    while open_fds(os.getpid()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(os.getpid()) <= before
