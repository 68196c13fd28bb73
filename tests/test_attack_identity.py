"""Attacks on identity (security.md, *Failures stay with one request*: the identity rows): caches bound to
who made them, and a client that a hostile exporter cannot make pay or accept wrong bytes. Imports are
keyed by the server that sent them (its kernel pid), a handle must belong to that server, the daemon's
publish sources are bound to the connection that sent them; a hostile exporter's sparse, oversized or
punched slab, or a reply for another adapter or version, is refused before it costs the client anything.
Every attacker is a real process of the same uid (tests/hostile.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import msgspec
import pytest
import torch

from lora_ipc import AdapterClient, LimitExceeded, LoraIpcError, ProtocolError
from lora_ipc.core import protocol as p
from lora_ipc.core.channels.endpoint import ServerIdentity
from lora_ipc.core.fetching.imports import check_owned_by

from . import models
from .helpers import bitwise_equal, private_endpoint
from .hostile import ATTACKER_BYTE, HostileServer, attacker_publish_main, staging_ids, trainer_main
from .procs import SPAWN, ExporterProcess


def holds_attacker_bytes(tensors: dict[str, torch.Tensor]) -> bool:
    return any(bool((t.view(torch.uint8) == ATTACKER_BYTE).all()) for t in tensors.values() if t.numel())


# ---- the import registry is keyed by who served the slab ---------------------------------------------


@pytest.mark.parametrize("generation", [False, True], ids=["no-generation-slot", "own-generation-slot"])
def test_a_hostile_server_cannot_poison_imports_from_a_legit_exporter(generation):
    """The attack of the issue: a hostile server answers once with the legit exporter's slab id and a
    sealed memfd of its own named like it; afterwards the legit exporter's fetches must be the legit
    bytes, even after the hostile server died."""
    legit = ExporterProcess(keep=2)
    hostile = None
    try:
        legit.call("publish_random", "policy", 7)
        want = models.random_adapter(7)
        hostile = HostileServer(private_endpoint("hostile"), "impersonate", legit=legit.endpoint, generation=generation)
        with AdapterClient(hostile.endpoint, timeout_s=10) as bad:
            if generation:  # its own memory and counter: served as what it is, from that server only
                assert holds_attacker_bytes(bad.fetch("policy").tensors)
            else:
                with pytest.raises(ProtocolError, match="generation slot"):
                    bad.fetch("policy")
            hostile.kill()
            with AdapterClient(legit.endpoint, timeout_s=10) as good:
                for _ in range(8):
                    got = good.fetch("policy").tensors
                    assert not holds_attacker_bytes(got)
                    assert all(bitwise_equal(got[k], want[k]) for k in want)
    finally:
        if hostile is not None:
            hostile.kill()
        legit.close()


def test_a_handle_must_belong_to_the_server_that_sent_it(tmp_path):
    """A handle names no process: its memory and its generation counter are the answering server's because
    they come by a descriptor channel served by that very process (the kernel's pid for the ZeroMQ reply).
    Descriptors of this process's slab, offered at a channel here, are refused to an import of a reply that
    another process (pid 1) answered: nothing is opened, nothing leaks. A handle without a generation slot
    is refused before any channel is asked."""
    from lora_ipc.core.backends.cpu import CpuBackend
    from lora_ipc.core.channels.fdchannel import FdReceiver, FdServer
    from lora_ipc.core.errors import EndpointNotTrusted
    from lora_ipc.core.fetching.imports import ImportRegistry
    from lora_ipc.core.memory.shm import GenerationTable

    endpoint = f"ipc://{tmp_path}/e.sock"
    channel = FdServer(endpoint, {os.getuid()}).start()
    table = GenerationTable(4)
    slab = CpuBackend().allocate(4096)
    slab.generation_fd = table.fd
    registry = ImportRegistry()
    try:
        handle = msgspec.structs.replace(slab.handle, generation=p.GenerationSlot(table.take_slot(), table.name))
        other = ServerIdentity(endpoint, pid=1, uid=os.getuid())
        with pytest.raises(EndpointNotTrusted, match="served by process"):
            registry.acquire(other, slab.slab_id, channel.attach(slab, handle), FdReceiver(endpoint))
        assert registry.users(slab.slab_id) == 0
        ours = ServerIdentity(endpoint, pid=os.getpid(), uid=os.getuid())
        key, imported = registry.acquire(ours, slab.slab_id, channel.attach(slab, handle), FdReceiver(endpoint))
        assert imported.generation_now() == 0  # the counter came with it, from the same channel
        registry.release(key)
        with pytest.raises(ProtocolError, match="without a generation slot"):
            check_owned_by(msgspec.structs.replace(handle, generation=None), ours)
        with pytest.raises(ProtocolError, match="without a generation slot"):
            registry.acquire(ours, slab.slab_id, channel.attach(slab, slab.handle), FdReceiver(endpoint))
    finally:
        channel.stop()
        slab.close()
        table.close()


def test_a_client_follows_a_restarted_daemon_by_its_kernel_pid(daemons):
    """libzmq reconnects to a new daemon on the same path by itself: the client sees the new process in
    the reply's kernel credentials, keeps nothing of the old one and serves the new bytes."""
    from lora_ipc import RemoteExporter
    from lora_ipc.core.fetching.imports import REGISTRY

    endpoint = private_endpoint("restart")
    first = daemons(endpoint)
    with RemoteExporter(endpoint) as remote:
        remote.publish("policy", models.constant_adapter(1), models.RANDOM_ADAPTER_CONFIG)
    with AdapterClient(endpoint, timeout_s=30) as client:
        assert client.fetch("policy").version == 1
        assert client._conn.server.pid == first.pid
        assert {k.server_pid for k in client._slabs} == {first.pid}
        first.kill()
        first.wait(10)
        second = daemons(endpoint)
        with RemoteExporter(endpoint) as remote:
            remote.publish("policy", models.constant_adapter(5), models.RANDOM_ADAPTER_CONFIG)
        got = client.fetch("policy")
        assert got.version == 1 and all(bool((t == 5).all()) for t in got.tensors.values())
        assert client._conn.server.pid == second.pid
        assert {k.server_pid for k in client._slabs} == {second.pid}
        assert not [k for k in REGISTRY._open if k.server_pid == first.pid]


# ---- the daemon's publish sources are bound to the connection that sent them -------------------------


def test_an_attacker_cannot_poison_the_daemons_copy_of_a_trainers_publishes(daemons):
    endpoint = private_endpoint("daemon")
    daemons(endpoint, "--keep", "8")
    conn, child = SPAWN.Pipe()
    trainer = SPAWN.Process(target=trainer_main, args=(child, endpoint), daemon=True)
    trainer.start()
    attacker = None
    try:
        assert conn.poll(120)
        trainer_pid = conn.recv()
        conn.send(("publish", 1))
        assert conn.poll(60) and conn.recv() == 1
        (victim,) = staging_ids(trainer_pid)  # what the attacker read from /proc/<trainer>/fd
        aconn, achild = SPAWN.Pipe()
        attacker = SPAWN.Process(target=attacker_publish_main, args=(achild, endpoint, victim, 8), daemon=True)
        attacker.start()
        assert aconn.poll(120)
        assert aconn.recv() == ["PublishReply"] * 9  # the daemon took every attacker publish
        with AdapterClient(endpoint, timeout_s=10) as client:
            for value in range(2, 7):
                conn.send(("publish", value))
                assert conn.poll(60)
                version = conn.recv()
                assert isinstance(version, int), version
                got = client.fetch("policy", version).tensors
                want = models.constant_adapter(value)
                assert all(bitwise_equal(got[k], want[k]) for k in want), f"v{version} is not the trainer's bytes"
        aconn.send("done")
    finally:
        for proc in (trainer, attacker):
            if proc is not None and proc.is_alive():
                proc.kill()
            if proc is not None:
                proc.join(10)


# ---- a hostile exporter against the client -----------------------------------------------------------


VICTIM = textwrap.dedent("""
    import json, os, sys
    from lora_ipc import AdapterClient, LoraIpcError

    def rss():
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem"):
                    fields[key] = int(value.split()[0]) << 10
        return fields

    endpoint, cap = sys.argv[1], sys.argv[2]
    client = AdapterClient(endpoint, timeout_s=30, **({} if cap == "-" else {"max_fetch_bytes": int(cap)}))
    before = rss()
    try:
        adapter = client.fetch("policy")
        outcome = ["ok", adapter.name, adapter.version]
    except LoraIpcError as exc:
        outcome = [type(exc).__name__, str(exc)[:300]]
    after = rss()
    print(json.dumps({"outcome": outcome, "peak_growth": after["VmHWM"] - before["VmRSS"],
                      "rss_growth": after["VmRSS"] - before["VmRSS"], "before": before, "after": after}))
""")


def run_victim(endpoint: str, cap: int | None = None, env: dict | None = None) -> dict:
    import json

    out = subprocess.run(
        [sys.executable, "-c", VICTIM, endpoint, "-" if cap is None else str(cap)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"victim: {result['outcome'][0]}, peak +{result['peak_growth'] >> 20} MiB, "
        f"RSS +{result['rss_growth'] >> 20} MiB"
    )
    return result


def test_a_sparse_slab_is_refused_before_it_costs_the_client_anything():
    """1 GiB sealed memfd that the exporter never reserved: on today's main the client paid for the
    exporter's pages and its own copy (+2 GiB); now the slab is refused before any byte is read."""
    hostile = HostileServer(private_endpoint("sparse"), "sparse", nbytes=1 << 30)
    try:
        result = run_victim(hostile.endpoint)
        assert result["outcome"][0] == "BackendError" and "not reserved" in result["outcome"][1], result
        assert result["peak_growth"] < (1 << 30) + (100 << 20)  # the bound: ~1.1 GiB in all
        assert result["peak_growth"] < 64 << 20  # in fact: nothing
        assert hostile.call("blocks") == 0  # the client did not fault in a single page of it
    finally:
        hostile.kill()


@pytest.mark.parametrize("how", ["argument", "env"])
def test_the_client_caps_the_bytes_it_copies_before_allocating(how):
    hostile = HostileServer(private_endpoint("big"), "reserved", nbytes=256 << 20)
    try:
        if how == "argument":
            result = run_victim(hostile.endpoint, cap=64 << 20)
        else:
            result = run_victim(hostile.endpoint, env={"LORA_IPC_MAX_FETCH_BYTES": str(64 << 20)})
        assert result["outcome"][0] == "LimitExceeded", result
        assert result["peak_growth"] < 32 << 20
    finally:
        hostile.kill()


def test_a_copy_costs_the_client_its_own_copy_even_if_the_exporter_punches_holes_later():
    """Reserved when imported, pages given back before the next copy: the client reads holes as zeros
    (pread) instead of allocating the exporter's pages (a read fault through a mapping would)."""
    hostile = HostileServer(private_endpoint("punch"), "reserved", nbytes=64 << 20)
    try:
        with AdapterClient(hostile.endpoint, timeout_s=30) as client:
            assert holds_attacker_bytes(client.fetch("policy").tensors)
            assert hostile.call("punch") == 0
            second = client.fetch("policy").tensors  # the slab is already imported: no new checks
            assert not holds_attacker_bytes(second)
            assert hostile.call("blocks") == 0  # nothing was allocated on the exporter's behalf
    finally:
        hostile.kill()


def test_the_default_cap_is_configurable_and_validated(monkeypatch):
    from lora_ipc.core.fetching.client import DEFAULT_MAX_FETCH_BYTES, fetch_bytes_limit

    monkeypatch.delenv("LORA_IPC_MAX_FETCH_BYTES", raising=False)
    assert fetch_bytes_limit() == DEFAULT_MAX_FETCH_BYTES
    monkeypatch.setenv("LORA_IPC_MAX_FETCH_BYTES", "12345")
    assert fetch_bytes_limit() == 12345 and fetch_bytes_limit(99) == 99
    for bad in ("lots", "-1", "0"):
        monkeypatch.setenv("LORA_IPC_MAX_FETCH_BYTES", bad)
        with pytest.raises(LoraIpcError):
            fetch_bytes_limit()


def test_a_reply_for_another_adapter_or_version_is_refused():
    hostile = HostileServer(private_endpoint("name"), "wrong_name", nbytes=64 << 10)
    try:
        with AdapterClient(hostile.endpoint, timeout_s=10) as client:
            with pytest.raises(ProtocolError, match="someone-else"):
                client.fetch("policy", 1)
            with pytest.raises(ProtocolError, match="someone-else"):
                client.fetch("policy")
    finally:
        hostile.kill()


def test_a_pinned_fetch_refuses_a_reply_of_another_version(exporter_proc):
    exporter_proc.call("publish_random", "pinned", 1)
    exporter_proc.call("publish_random", "pinned", 2)
    from lora_ipc.core.fetching.client import _check_reply

    with AdapterClient(exporter_proc.endpoint) as client:
        assert client.fetch("pinned", 1).version == 1
    reply = p.FetchReply("pinned", 2, 1, b"\0" * 16, None, "s", None, 0, b"\0" * 16, None, 256, [], "0f")
    _check_reply(reply, "pinned", None, 1 << 20)  # newest: any version of that name
    with pytest.raises(ProtocolError, match="v2"):
        _check_reply(reply, "pinned", 1, 1 << 20)
    with pytest.raises(LimitExceeded):
        _check_reply(reply, "pinned", 2, 128)


def test_the_vllm_bound_is_one_lora_slot_of_the_workers_buffers(monkeypatch):
    """``fetch_bound`` reads vLLM's preallocated stacked LoRA buffers (shapes as vLLM 0.32 makes them)."""
    from types import SimpleNamespace

    from lora_ipc.vllm.bounds import ALIGN_SLACK, MIN_BOUND, fetch_bound

    monkeypatch.delenv("LORA_IPC_MAX_FETCH_BYTES", raising=False)
    max_loras, rank = 4, 16

    def layer(inp, outs, tp=1):
        return SimpleNamespace(
            tp_size=tp,
            lora_a_stacked=tuple(torch.empty(max_loras, 1, rank, inp, device="meta") for _ in outs),
            lora_b_stacked=tuple(torch.empty(max_loras, 1, o, rank, device="meta") for o in outs),
        )

    big = SimpleNamespace(
        _adapter_manager=SimpleNamespace(
            modules={f"layers.{i}.qkv_proj": layer(4096, [4096, 1024, 1024]) for i in range(32)}
        )
    )
    per_slot = 32 * (3 * rank * 4096 + rank * (4096 + 1024 + 1024))
    assert fetch_bound(big) == per_slot * 8 + 32 * 6 * ALIGN_SLACK
    tiny = SimpleNamespace(_adapter_manager=SimpleNamespace(modules={"q": layer(128, [128])}))
    assert fetch_bound(tiny) == MIN_BOUND
    assert fetch_bound(SimpleNamespace()) is None  # not a vLLM we know: the client's default
    monkeypatch.setenv("LORA_IPC_MAX_FETCH_BYTES", "1000")
    assert fetch_bound(big) is None  # the operator's setting wins
