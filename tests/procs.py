"""Child-process entry points for the two-process tests (started with the spawn method).

The control pipe between the test and its child is test scaffolding only; the adapter data path under
test is lora_ipc's own socket and shared memory.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch

from lora_ipc.core.errors import LoraIpcError
from lora_ipc.core.protocol import tag

SPAWN = mp.get_context("spawn")


CLOSED = object()  # what a command returns to end its process's loop (after answering "closed")


def serve_commands(conn, commands: dict, state) -> None:
    """The child's loop: ``commands[name](state, *args)`` for each ``(name, *args)`` received; the return
    value (or the exception raised) goes back to the test. A command returning :data:`CLOSED` ends it."""
    while True:
        cmd, *args = conn.recv()
        try:
            command = commands.get(cmd)
            if command is None:
                raise RuntimeError(f"unknown command {cmd}")
            out = command(state, *args)
        except Exception as exc:  # report to the test instead of dying silently
            conn.send(exc)
            continue
        if out is CLOSED:
            conn.send("closed")
            return
        conn.send(out)


# ---- the exporter child: one small function per command ---------------------------------------


@dataclass
class ExporterState:
    exporter: Any
    device: str
    fetch_stalled: Any  # a multiprocessing Event: set once a stalled fetch is inside the exporter
    peft_models: dict = field(default_factory=dict)


def _publish_peft(s, name, dtype, seed, save_dir):
    """A real PEFT model, published; the reference is written the ordinary way to ``save_dir``."""
    from . import models

    model = s.peft_models[(name, dtype)] = models.peft_model(seed, getattr(torch, dtype)).to(s.device)
    version = s.exporter.publish(name, model)
    if save_dir:
        model.save_pretrained(save_dir)
    return version


def _train_and_publish(s, name, dtype, step, save_dir):
    from . import models

    model = s.peft_models[(name, dtype)]
    models.train_step(model, step)
    version = s.exporter.publish(name, model)
    if save_dir:
        model.save_pretrained(save_dir)
    return version


def _publish_random(s, name, seed):
    from . import models

    tensors = {k: v.to(s.device) for k, v in models.random_adapter(seed).items()}
    return s.exporter.publish(name, tensors, models.RANDOM_ADAPTER_CONFIG)


def _publish_tensor_set(s, name, seed):
    """The core's publish (no LoRA config), as the refit layer publishes its buckets."""
    from lora_ipc import TensorSetExporter

    from . import models

    return TensorSetExporter.publish(s.exporter, name, models.random_adapter(seed))


def _stream(s, name):
    """Publish a new version continuously until the process is killed."""
    from . import models

    def loop():
        i = 0
        while True:
            s.exporter.publish(name, models.random_adapter(i % 7), models.RANDOM_ADAPTER_CONFIG)
            i += 1
            time.sleep(0.001)  # pacing, not synchronisation

    s.exporter.publish(name, models.random_adapter(0), models.RANDOM_ADAPTER_CONFIG)
    threading.Thread(target=loop, daemon=True).start()
    return "streaming"


def _stream_constant(s, name):
    """Version v is an adapter whose every value is v (a torn read shows), published continuously."""
    from . import models

    def loop():
        v = 0
        while True:
            v += 1
            published = s.exporter.publish(name, models.constant_adapter(v), models.RANDOM_ADAPTER_CONFIG)
            assert published == v

    threading.Thread(target=loop, daemon=True).start()
    return "streaming"


def _stall_next_fetch(s, seconds):
    """The next lease is granted only after ``seconds``; ``fetch_stalled`` is set when its request arrives."""
    original = s.exporter.store.lease

    def slow_lease(*a, **kw):
        s.exporter.store.lease = original
        s.fetch_stalled.set()
        time.sleep(seconds)  # the injected fault: a server stuck inside a request
        return original(*a, **kw)

    s.fetch_stalled.clear()
    s.exporter.store.lease = slow_lease
    return "armed"


def _publish_constant_behind_work(s, name, value, cycles):
    """The pack queues behind ``cycles`` of GPU work on the current stream."""
    from . import models

    tensors = {k: v.to(s.device) for k, v in models.constant_adapter(value).items()}
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    return s.exporter.publish(name, tensors, models.RANDOM_ADAPTER_CONFIG)


def _publish_constant_on_side_stream(s, name, value, cycles):
    """Packed on a side stream behind ``cycles`` of GPU work."""
    from . import models

    tensors = {k: v.to(s.device) for k, v in models.constant_adapter(value).items()}
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(cycles)
        return s.exporter.publish(name, tensors, models.RANDOM_ADAPTER_CONFIG)


def _queue_work(s, cycles):
    """``cycles`` queued on this process's current stream, not waited for."""
    torch.cuda._sleep(cycles)
    return "queued"


def _set_allocator_settings(s, *settings):
    from lora_ipc.core.backends.cuda_allocator import _set_allocator_settings as set_settings

    for one in settings:
        set_settings(one)
    return "set"


def _effective_settings(s):
    from lora_ipc.core.backends.cuda_allocator import allocator_settings, effective_allocator_settings

    return allocator_settings(), effective_allocator_settings()


def _allocator_settings(s):
    from lora_ipc.core.backends.cuda_allocator import allocator_settings

    return allocator_settings()


def _handle_kinds(s):
    from lora_ipc.core.backends.cuda_allocator import HANDLE_KIND_OFFSET

    return sorted(
        {
            bytes(slab.handle.storage_handle[HANDLE_KIND_OFFSET : HANDLE_KIND_OFFSET + 1]).decode()
            for slab in s.exporter.store.pool.slabs()
        }
    )


def _cuda_memory(s):
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


def _close_exporter(s):
    """Close the store, keep the process: what stays allocated?"""
    s.exporter.close()
    torch.cuda.synchronize()
    torch.cuda.ipc_collect()
    return _cuda_memory(s)


def _close_keep_serving_commands(s):
    """Close the exporter (its store and server); the process goes on."""
    s.exporter.close()


def _newest_entry(s, name):
    """What the store's board says of ``name``'s newest version (a NewestEntry)."""
    from lora_ipc.core.memory.board import NewestEntry

    store = s.exporter.store
    pv = store._versions[name][store.newest_version(name)]
    return NewestEntry(
        pv.version, pv.generation, pv.layout.used_bytes, pv.layout.digest, pv.config_digest, pv.slab.slab_id
    )


def _forge_board(s, name, entry):
    """Post ``entry`` as ``name``'s board entry, whatever it names (a hostile exporter's board)."""
    store = s.exporter.store
    store.pool.post_newest(store._board[name][0], entry)


def _status(s):
    return s.exporter.store.status()


def _close(s):
    s.exporter.close()
    return CLOSED


EXPORTER_COMMANDS = {
    "publish_peft": _publish_peft,
    "train_and_publish": _train_and_publish,
    "publish_random": _publish_random,
    "publish_tensor_set": _publish_tensor_set,
    "stream": _stream,
    "stream_constant": _stream_constant,
    "stall_next_fetch": _stall_next_fetch,
    "publish_constant_behind_work": _publish_constant_behind_work,
    "publish_constant_on_side_stream": _publish_constant_on_side_stream,
    "queue_work": _queue_work,
    "set_allocator_settings": _set_allocator_settings,
    "effective_settings": _effective_settings,
    "close_exporter": _close_exporter,
    "close_keep_serving_commands": _close_keep_serving_commands,
    "allocator_settings": _allocator_settings,
    "handle_kinds": _handle_kinds,
    "status": _status,
    "newest_entry": _newest_entry,
    "forge_board": _forge_board,
    "cuda_memory": _cuda_memory,
    "close": _close,
}


def _exporter_main(conn, endpoint, keep, lease_timeout_s, device, fetch_stalled):
    from lora_ipc import AdapterExporter

    exporter = AdapterExporter(endpoint, keep=keep, lease_timeout_s=lease_timeout_s)
    conn.send((exporter.endpoint, os.getpid()))
    serve_commands(conn, EXPORTER_COMMANDS, ExporterState(exporter, device, fetch_stalled))


class ExporterProcess:
    """An AdapterExporter in its own spawned process, driven over a control pipe."""

    def __init__(
        self,
        endpoint: str | None = None,
        keep: int = 2,
        lease_timeout_s: float = 30.0,
        device: str = "cpu",
        env: dict | None = None,
    ):
        self._conn, child = SPAWN.Pipe()
        self.fetch_stalled = SPAWN.Event()  # set by the child once a fetch stalled by "stall_next_fetch" arrived
        self.proc = SPAWN.Process(
            target=_exporter_main,
            args=(child, endpoint, keep, lease_timeout_s, device, self.fetch_stalled),
            daemon=True,
        )
        with mock.patch.dict(os.environ, env or {}):  # the spawned child inherits ``env``; this process keeps its own
            self.proc.start()
        if not self._conn.poll(120):
            raise RuntimeError("exporter process did not start")
        self.endpoint, self.pid = self._conn.recv()

    def call(self, *cmd, timeout: float = 120.0):
        self._conn.send(cmd)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"exporter did not answer {cmd[0]}")
        out = self._conn.recv()
        if isinstance(out, Exception):
            raise out
        return out

    def kill(self) -> None:
        """SIGKILL, and wait until the process is reaped (its files, and a CUDA context with them, closed)."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.join(60)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("close", timeout=20)
            except Exception:
                self.kill()
        self.proc.join(10)


# ---- the client child ------------------------------------------------------------------------


def _fetch(client, name, version):
    adapter = client.fetch(name, version)
    return adapter.version, {k: v.clone() for k, v in adapter.tensors.items()}


def _fetch_many(client, name, count):
    """The versions of ``count`` fetches."""
    return [client.fetch(name).version for _ in range(count)]


def _fetch_checking_constant(client, name, count):
    """(versions seen, torn adapters) over ``count`` fetches of a "stream_constant" adapter."""
    versions, torn = [], 0
    for _ in range(count):
        a = client.fetch(name)
        versions.append(a.version)
        torn += any(not bool((t == a.version).all()) for t in a.tensors.values())
    return versions, torn


def _hold_lease(client, name):
    """Lease the newest version and never release it."""
    from lora_ipc.core import protocol as p

    return client._conn.request(p.FetchRequest(name, None, client.client_id), p.FetchReply).lease_id


def _close_client(client):
    client.close()
    return CLOSED


CLIENT_COMMANDS = {
    "fetch": _fetch,
    "fetch_many": _fetch_many,
    "fetch_checking_constant": _fetch_checking_constant,
    "hold_lease": _hold_lease,
    "close": _close_client,
}


def _client_main(conn, endpoint, timeout_s):
    from lora_ipc import AdapterClient

    client = AdapterClient(endpoint, timeout_s=timeout_s)
    conn.send(os.getpid())
    serve_commands(conn, CLIENT_COMMANDS, client)


class ClientProcess:
    def __init__(self, endpoint: str, timeout_s: float = 10.0):
        self._conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_client_main, args=(child, endpoint, timeout_s), daemon=True)
        self.proc.start()
        self.pid = self._conn.recv()

    call = ExporterProcess.call
    kill = ExporterProcess.kill
    close = ExporterProcess.close


def _remote_publish_main(endpoint, save_dir, seed):
    from lora_ipc import RemoteExporter

    from . import models

    model = models.peft_model(seed, torch.bfloat16)
    with RemoteExporter(endpoint) as exporter:
        version = exporter.publish("policy", model)
    model.save_pretrained(save_dir)
    print("published version", version, flush=True)


def publish_from_short_lived_trainer(endpoint: str, save_dir: str, seed: int = 0) -> int:
    """A trainer process that publishes one version into a daemon and exits; returns its exit code."""
    proc = SPAWN.Process(target=_remote_publish_main, args=(endpoint, save_dir, seed))
    proc.start()
    try:
        proc.join(120)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    return proc.exitcode


# ---- a full-weight trainer (vLLM weight-transfer framework, lora_ipc backend) -----------------


class PipeSyncClient:
    """The four-method ``VLLMWeightSyncClient`` in the trainer process, forwarding each call to the test
    process (which owns the ``LLM``). Test scaffolding: the weights themselves go through lora_ipc."""

    def __init__(self, conn):
        self._conn = conn

    def _call(self, method, *args):
        self._conn.send((method, args))
        ok, detail = self._conn.recv()
        if not ok:
            raise RuntimeError(f"{method} failed in the engine: {detail}")

    def init_weight_transfer_engine(self, init_info):
        self._call("init_weight_transfer_engine", init_info)

    def start_weight_update(self):
        self._call("start_weight_update")

    def update_weights(self, update_info):
        self._call("update_weights", update_info)

    def finish_weight_update(self, weight_version=None):
        self._call("finish_weight_update", weight_version)


@dataclass
class RefitTrainerState:
    model: Any
    rpc_conn: Any
    transfer: Any = None


def _refit_init(s, kind, base_url, fields):
    """Client kind ("pipe" | "http"), base url, init info fields; returns the sender's endpoint."""
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from lora_ipc.vllm.weight_transfer import LoraIpcTrainerInitInfo

    if kind == "http":
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient

        client = HTTPVLLMWeightSyncClient(base_url, timeout=120)
    else:
        client = PipeSyncClient(s.rpc_conn)
    if s.transfer is not None:
        s.transfer.shutdown()
    s.transfer = WeightTransferTrainerFactory.trainer_init(
        LoraIpcTrainerInitInfo(rank=0, **fields), client=client, source=ModuleSource(s.model)
    )
    return s.transfer.sender.endpoint


def _refit_step(s, step, send, save_dir, weight_version):
    """One training step, then (if ``send``) a refit; the weights are saved to ``save_dir`` if given."""
    from lora_ipc.tiny import write_tokenizer

    from . import models

    models.perturb_weights(s.model, step)
    if send:
        s.transfer.send_weights(weight_version=weight_version)
    if save_dir:
        s.model.save_pretrained(save_dir)
        write_tokenizer(save_dir)
    return step


def _refit_close(s):
    if s.transfer is not None:
        s.transfer.shutdown()
    return CLOSED


REFIT_TRAINER_COMMANDS = {"init": _refit_init, "step": _refit_step, "close": _refit_close}


def _refit_trainer_main(conn, rpc_conn):
    from lora_ipc.tiny import tiny_llama

    model = tiny_llama(0, torch.bfloat16)  # the weights tests.engine.write_model_dir saves
    conn.send(os.getpid())
    serve_commands(conn, REFIT_TRAINER_COMMANDS, RefitTrainerState(model, rpc_conn))


class RefitTrainerProcess:
    """A trainer holding the tiny Llama in its own process, refitting an engine through the
    ``lora_ipc`` weight-transfer backend. With the "pipe" client, :meth:`call` serves the trainer's
    four-method calls with ``handler(method, *args)`` in this process while it waits."""

    def __init__(self):
        self._conn, child = SPAWN.Pipe()
        self._rpc, rpc_child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_refit_trainer_main, args=(child, rpc_child), daemon=True)
        self.proc.start()
        if not self._conn.poll(120):
            raise RuntimeError("trainer process did not start")
        self.pid = self._conn.recv()

    def call(self, *cmd, handler=None, timeout: float = 300.0):
        self._conn.send(cmd)
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.01):
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainer did not answer {cmd[0]}")
            if not self.proc.is_alive():
                raise ProcessLookupError("trainer process is gone")
            if handler is not None and self._rpc.poll():
                method, args = self._rpc.recv()
                try:
                    handler(method, *args)
                    reply = (True, None)
                except Exception as exc:  # a text boundary, as vLLM's HTTP routes are: typed codes stay on
                    reply = (
                        False,
                        tag(type(exc), str(exc)) if isinstance(exc, LoraIpcError) else f"{type(exc).__name__}: {exc}",
                    )
                if self.proc.is_alive():
                    self._rpc.send(reply)
        try:
            out = self._conn.recv()
        except EOFError:
            raise ProcessLookupError("trainer process is gone") from None
        if isinstance(out, Exception):
            raise out
        return out

    kill = ExporterProcess.kill
    close = ExporterProcess.close
