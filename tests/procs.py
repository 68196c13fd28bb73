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

import torch

from lora_ipc.errors import LoraIpcError, tag

SPAWN = mp.get_context("spawn")


def _exporter_main(conn, endpoint, keep, lease_timeout_s, device):
    from lora_ipc import AdapterExporter

    from . import models

    exporter = AdapterExporter(endpoint, keep=keep, lease_timeout_s=lease_timeout_s)
    conn.send((exporter.endpoint, os.getpid()))
    peft_models = {}
    streaming = threading.Event()
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "publish_peft":  # name, dtype, seed, save_dir (reference written the ordinary way)
                name, dtype, seed, save_dir = args
                model = peft_models[(name, dtype)] = models.peft_model(seed, getattr(torch, dtype)).to(device)
                version = exporter.publish(name, model)
                if save_dir:
                    model.save_pretrained(save_dir)
                conn.send(version)
            elif cmd == "train_and_publish":  # name, dtype, step, save_dir
                name, dtype, step, save_dir = args
                model = peft_models[(name, dtype)]
                models.train_step(model, step)
                version = exporter.publish(name, model)
                if save_dir:
                    model.save_pretrained(save_dir)
                conn.send(version)
            elif cmd == "publish_random":  # name, seed
                name, seed = args
                tensors = {k: v.to(device) for k, v in models.random_adapter(seed).items()}
                conn.send(exporter.publish(name, tensors, models.RANDOM_ADAPTER_CONFIG))
            elif cmd == "stream":  # publish a new version continuously until killed
                name, = args
                streaming.set()

                def loop(name=name):  # bound now: the command loop rebinds `name`
                    i = 0
                    while True:
                        exporter.publish(name, models.random_adapter(i % 7), models.RANDOM_ADAPTER_CONFIG)
                        i += 1
                        time.sleep(0.001)

                exporter.publish(name, models.random_adapter(0), models.RANDOM_ADAPTER_CONFIG)
                threading.Thread(target=loop, daemon=True).start()
                conn.send("streaming")
            elif cmd == "stream_constant":  # version v is an adapter whose every value is v (a torn read shows)
                name, = args

                def constant_loop(name=name):
                    v = 0
                    while True:
                        v += 1
                        published = exporter.publish(name, models.constant_adapter(v), models.RANDOM_ADAPTER_CONFIG)
                        assert published == v

                threading.Thread(target=constant_loop, daemon=True).start()
                conn.send("streaming")
            elif cmd == "stall_next_fetch":  # the next lease is granted only after `seconds`
                seconds, = args
                original = exporter.store.lease

                def slow_lease(*a, original=original, seconds=seconds, **kw):
                    exporter.store.lease = original
                    time.sleep(seconds)
                    return original(*a, **kw)

                exporter.store.lease = slow_lease
                conn.send("armed")
            elif cmd == "publish_constant_behind_work":  # name, value, sleep_cycles: the pack queues behind GPU work
                name, value, cycles = args
                tensors = {k: v.to(device) for k, v in models.constant_adapter(value).items()}
                torch.cuda.synchronize()
                torch.cuda._sleep(cycles)
                conn.send(exporter.publish(name, tensors, models.RANDOM_ADAPTER_CONFIG))
            elif cmd == "publish_constant_on_side_stream":  # name, value, sleep_cycles: packed on a side stream
                name, value, cycles = args
                tensors = {k: v.to(device) for k, v in models.constant_adapter(value).items()}
                torch.cuda.synchronize()
                side = torch.cuda.Stream()
                with torch.cuda.stream(side):
                    torch.cuda._sleep(cycles)
                    version = exporter.publish(name, tensors, models.RANDOM_ADAPTER_CONFIG)
                conn.send(version)
            elif cmd == "queue_work":  # sleep_cycles queued on this process's current stream, not waited for
                cycles, = args
                torch.cuda._sleep(cycles)
                conn.send("queued")
            elif cmd == "set_allocator_settings":
                from lora_ipc.backends.cuda import _set_allocator_settings

                for settings in args:
                    _set_allocator_settings(settings)
                conn.send("set")
            elif cmd == "effective_settings":
                from lora_ipc.backends.cuda import allocator_settings, effective_allocator_settings

                conn.send((allocator_settings(), effective_allocator_settings()))
            elif cmd == "close_exporter":  # close the store, keep the process: what stays allocated?
                exporter.close()
                torch.cuda.synchronize()
                torch.cuda.ipc_collect()
                conn.send((torch.cuda.memory_allocated(), torch.cuda.memory_reserved()))
            elif cmd == "allocator_settings":
                from lora_ipc.backends.cuda import allocator_settings

                conn.send(allocator_settings())
            elif cmd == "handle_kinds":
                from lora_ipc.backends.cuda import HANDLE_KIND_OFFSET

                conn.send(sorted({bytes(s.handle.storage_handle[HANDLE_KIND_OFFSET:HANDLE_KIND_OFFSET + 1]).decode()
                                  for s in exporter.store._all_slabs()}))
            elif cmd == "status":
                conn.send(exporter.store.status())
            elif cmd == "cuda_memory":
                conn.send((torch.cuda.memory_allocated(), torch.cuda.memory_reserved()))
            elif cmd == "close":
                exporter.close()
                conn.send("closed")
                return
            else:
                conn.send(RuntimeError(f"unknown command {cmd}"))
        except Exception as exc:  # report to the test instead of dying silently
            conn.send(exc)


class ExporterProcess:
    """An AdapterExporter in its own spawned process, driven over a control pipe."""

    def __init__(self, endpoint: str | None = None, keep: int = 2, lease_timeout_s: float = 30.0,
                 device: str = "cpu", env: dict | None = None):
        self._conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_exporter_main, args=(child, endpoint, keep, lease_timeout_s, device),
                                  daemon=True)
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
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
        os.kill(self.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("close", timeout=20)
            except Exception:
                self.kill()
        self.proc.join(10)


def _client_main(conn, endpoint, timeout_s):
    from lora_ipc import AdapterClient

    client = AdapterClient(endpoint, timeout_s=timeout_s)
    conn.send(os.getpid())
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "fetch":
                name, version = args
                adapter = client.fetch(name, version)
                conn.send((adapter.version, {k: v.clone() for k, v in adapter.tensors.items()}))
            elif cmd == "fetch_many":  # name, count -> list of versions
                name, count = args
                conn.send([client.fetch(name).version for _ in range(count)])
            elif cmd == "fetch_checking_constant":  # name, count -> (versions seen, torn adapters)
                name, count = args
                versions, torn = [], 0
                for _ in range(count):
                    a = client.fetch(name)
                    versions.append(a.version)
                    torn += any(not bool((t == a.version).all()) for t in a.tensors.values())
                conn.send((versions, torn))
            elif cmd == "hold_lease":  # lease the newest version and never release it
                from lora_ipc import protocol as p

                name, = args
                reply = client._conn.request(p.FetchRequest(name, None, client.client_id), p.FetchReply)
                conn.send(reply.lease_id)
            elif cmd == "close":
                client.close()
                conn.send("closed")
                return
        except Exception as exc:
            conn.send(exc)


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
    proc.join(120)
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


def _refit_trainer_main(conn, rpc_conn):
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from lora_ipc.tiny import tiny_llama, write_tokenizer
    from lora_ipc.vllm.weight_transfer import LoraIpcTrainerInitInfo

    from . import models

    model = tiny_llama(0, torch.bfloat16)  # the weights tests.engine.write_model_dir saves
    transfer = None
    conn.send(os.getpid())
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "init":  # client kind ("pipe" | "http"), base url, init info fields
                kind, base_url, fields = args
                if kind == "http":
                    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient

                    client = HTTPVLLMWeightSyncClient(base_url, timeout=120)
                else:
                    client = PipeSyncClient(rpc_conn)
                if transfer is not None:
                    transfer.shutdown()
                transfer = WeightTransferTrainerFactory.trainer_init(
                    LoraIpcTrainerInitInfo(rank=0, **fields), client=client, source=ModuleSource(model))
                conn.send(transfer.sender.endpoint)
            elif cmd == "step":  # step, send?, save_dir, weight_version: one training step, then refit
                step, send, save_dir, weight_version = args
                models.perturb_weights(model, step)
                if send:
                    transfer.send_weights(weight_version=weight_version)
                if save_dir:
                    model.save_pretrained(save_dir)
                    write_tokenizer(save_dir)
                conn.send(step)
            elif cmd == "close":
                if transfer is not None:
                    transfer.shutdown()
                conn.send("closed")
                return
            else:
                conn.send(RuntimeError(f"unknown command {cmd}"))
        except Exception as exc:
            conn.send(exc)


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
                    reply = (False, tag(type(exc), str(exc)) if isinstance(exc, LoraIpcError)
                             else f"{type(exc).__name__}: {exc}")
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
