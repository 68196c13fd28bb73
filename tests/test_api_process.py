"""What vLLM's API process asks of lora_ipc (no engine): dead or stuck endpoints cost only their own
requests, shared clients are evicted without holding a lock across I/O and fail typed afterwards,
the resolver treats any malformed version as not found, and a store's epoch pins its version numbers."""

import asyncio
import os
import socket
import threading
import time

import pytest
import torch

from lora_ipc import AdapterClient, AdapterExporter, LoraIpcError
from lora_ipc.core.errors import ClientClosed, StaleEpoch
from lora_ipc.lora.uri import AdapterURI

from . import models

CONFIG = models.RANDOM_ADAPTER_CONFIG


@pytest.fixture
def exporter(short_dir):
    with AdapterExporter(f"ipc://{short_dir}/live.sock", keep=2) as exp:
        exp.publish("policy", models.random_adapter(1), CONFIG)
        yield exp


def hung_endpoint(directory, i):
    """A listener that accepts connections into its backlog and never answers (a stopped exporter)."""
    path = os.path.join(directory, f"hung-{i}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    return f"ipc://{path}", sock


# ---- 11. resolver -------------------------------------------------------------------------------


def test_resolver_treats_malformed_or_oversized_versions_as_not_found(exporter):
    pytest.importorskip("vllm")
    from lora_ipc.vllm.resolver import LoraIpcResolver

    resolver = LoraIpcResolver(exporter.endpoint)
    for model in ("policy@v" + "9" * 5000, "policy@v0", "policy@v01", "policy@v" + "9" * 19, "@v1"):
        assert asyncio.run(resolver.resolve_lora("base", model)) is None, model[:40]
    found = asyncio.run(resolver.resolve_lora("base", "policy@v1"))
    assert AdapterURI.parse(found.lora_path).version == 1


# ---- 10. stalls in the API process ----------------------------------------------------------------


def test_stuck_endpoints_cost_only_their_own_requests(exporter, short_dir, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("LORA_IPC_TIMEOUT_S", "4")
    monkeypatch.setenv("LORA_IPC_ENDPOINT", exporter.endpoint)
    from lora_ipc.vllm.openai import check_lora_ipc_path
    from lora_ipc.vllm.resolver import LoraIpcResolver

    listeners = [hung_endpoint(short_dir, i) for i in range(12)]
    dead = [f"ipc://{short_dir}/nobody-{i}.sock" for i in range(12)]

    async def scenario():
        stuck = [
            asyncio.ensure_future(check_lora_ipc_path(str(AdapterURI("policy", 1, ep, "ab")))) for ep, _ in listeners
        ]
        gone = [asyncio.ensure_future(check_lora_ipc_path(str(AdapterURI("policy", 1, ep, "ab")))) for ep in dead]
        await asyncio.sleep(0)  # every stuck request has started
        resolved = await LoraIpcResolver(exporter.endpoint).resolve_lora("base", "policy")
        stuck_done_first = sum(t.done() for t in stuck)
        dead_results = await asyncio.gather(*gone)
        stuck_results = await asyncio.gather(*stuck)
        return resolved, stuck_done_first, dead_results, stuck_results

    try:
        resolved, stuck_done_first, dead_results, stuck_results = asyncio.run(scenario())
    finally:
        for _, sock in listeners:
            sock.close()
    assert resolved is not None and AdapterURI.parse(resolved.lora_path).version == 1
    assert stuck_done_first == 0  # the legitimate resolution did not wait for any stuck endpoint
    assert all(r is not None and r[0] == 503 for r in dead_results + stuck_results)
    assert all("nothing serves" in r[1] for r in dead_results)  # nothing listening: refused without waiting


def test_one_stuck_endpoint_holds_at_most_its_pending_cap(short_dir, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("LORA_IPC_TIMEOUT_S", "3")
    from lora_ipc.vllm import api_io
    from lora_ipc.vllm.openai import check_lora_ipc_path

    ep, sock = hung_endpoint(short_dir, "one")

    async def scenario():
        tasks = [asyncio.ensure_future(check_lora_ipc_path(str(AdapterURI("policy", 1, ep, "ab")))) for _ in range(10)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        early = [t.result() for t in tasks if t.done()]
        waiting = api_io.pending(ep)
        await asyncio.gather(*tasks)
        return early, waiting

    try:
        early, waiting = asyncio.run(scenario())
    finally:
        sock.close()
    assert waiting == api_io.MAX_PENDING_PER_ENDPOINT
    assert len(early) == 10 - api_io.MAX_PENDING_PER_ENDPOINT
    assert all(status == 503 and "pending" in reason for status, reason in early)
    assert api_io.pending(ep) == 0


def test_evicting_a_shared_client_never_waits_for_its_request_in_flight(short_dir, monkeypatch):
    from lora_ipc.lora import adapters

    monkeypatch.setenv("LORA_IPC_TIMEOUT_S", "4")
    ep, sock = hung_endpoint(short_dir, "x")
    try:
        stuck = adapters.shared_client(ep)
        errors = []
        worker = threading.Thread(target=lambda: errors.append(_raises(stuck.list)))
        worker.start()
        deadline = time.monotonic() + 60
        while not stuck._lock.locked():  # until the request is in flight, holding its client's lock
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.001)
        for i in range(adapters.MAX_SHARED_CLIENTS):  # evicts `stuck`
            adapters.shared_client(f"ipc://{short_dir}/other-{i}.sock")
        assert worker.is_alive()  # eviction returned while the stuck request still waits for its reply
        worker.join()
    finally:
        sock.close()
    assert isinstance(errors[0], LoraIpcError)
    with pytest.raises(ClientClosed):
        stuck.list()


def _raises(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        return exc
    return None


def test_a_client_evicted_before_use_fails_typed_and_a_fresh_one_works(exporter, short_dir):
    from lora_ipc.lora import adapters

    held = adapters.shared_client(exporter.endpoint)
    for i in range(adapters.MAX_SHARED_CLIENTS):
        adapters.shared_client(f"ipc://{short_dir}/other-{i}.sock")
    with pytest.raises(ClientClosed):  # was a raw zmq.error.ZMQError
        held.versions("policy")
    assert adapters.with_shared_client(exporter.endpoint, lambda c: c.versions("policy")) == [1]


def test_a_closed_client_raises_a_lora_ipc_error(exporter):
    client = AdapterClient(exporter.endpoint)
    client.list()
    client.close()
    for call in (client.list, client.status, lambda: client.fetch("policy")):
        with pytest.raises(ClientClosed):
            call()


# ---- 6. epochs ------------------------------------------------------------------------------------


def test_a_restarted_exporter_refuses_versions_of_its_previous_epoch(short_dir):
    pytest.importorskip("vllm")
    from lora_ipc.vllm.request import lora_int_id_for

    endpoint = f"ipc://{short_dir}/restart.sock"
    with AdapterExporter(endpoint) as first:
        first.publish("p", {k: torch.ones_like(v) for k, v in models.random_adapter(0).items()}, CONFIG)
        with AdapterClient(endpoint) as client:
            old = client.catalog().epoch
            assert client.fetch("p", 1, epoch=old).version == 1
    with AdapterExporter(endpoint) as second:
        second.publish("p", {k: torch.zeros_like(v) for k, v in models.random_adapter(0).items()}, CONFIG)
        with AdapterClient(endpoint) as client:
            new = client.catalog().epoch
            assert new != old
            with pytest.raises(StaleEpoch):
                client.fetch("p", 1, epoch=old)
            assert all(float(t.abs().sum()) == 0 for t in client.fetch("p", 1, epoch=new).tensors.values())
    assert lora_int_id_for("p", 1, old) != lora_int_id_for("p", 1, new)
    with pytest.raises(LoraIpcError, match="epoch"):  # a pinned version without its epoch names nothing
        AdapterURI.parse(f"lora-ipc://p/v1?endpoint={endpoint}")
