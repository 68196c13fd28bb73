#!/usr/bin/env python3
# ruff: noqa: E501 - a copy of /work/shared/gpu/review_probe.py (the reviewer's probe), kept as written
"""GPU review probe for lora_ipc's CUDA IPC path, against the CURRENT API (AdapterExporter / AdapterClient,
the process-wide import registry, fresh export per handle-carrying reply, plain_segments, host fallback).

One command, one GPU (written for the lent H200, torch 2.11+cu130); about 1-2 minutes, hard deadline
--deadline seconds (default 220):

    PYTHONUNBUFFERED=1 python3 gpu_review_probe.py --repo /path/to/lora_ipc/checkout --wheels .whl

Needs torch with CUDA, pyzmq and msgpack importable, and the lora_ipc checkout (``--repo``, default
$LORA_IPC_REPO, else the current directory). ``--wheels DIR`` first installs every wheel in DIR, offline,
into a private --target directory (the device has no pyzmq; carry its wheel). Without CUDA it prints a
"no CUDA" line and exits 2; a missing dependency also exits 2 with the reason. ``--selftest-cpu`` runs
only the process plumbing (spawned consumers, fetch loops) on CPU slabs, to check the probe itself.

Output: one JSON line per check: {"check", "verdict", "expect", ...measurements}. verdict:
  pass  lora_ipc behaved as its developers claim      fail   the reviewer's predicted bug showed up
  info  a measurement without a pass/fail rule         error  the probe could not finish the check
  skip  not applicable here
Nothing asserts: one failing check never hides the others. Exit 0 = ran (whatever the verdicts),
2 = could not run here, 1 = the probe itself crashed or its watchdog fired.

Processes: this process is the trainer T (several AdapterExporters on cuda:0). W1-W3 are spawned consumers
(AdapterClient), W4 a consumer that sees no GPU (CUDA_VISIBLE_DEVICES=""), X a spawned trainer started
with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,max_split_size_mb:256 (allocator settings, then
SIGKILLed while W3 still maps its slab). Only the standard library is imported at module level, so this
file imports (and ast-parses) anywhere.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

MiB = 1 << 20
CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "peft_type": "LORA", "bias": "none"}
ALLOC_ENV = "expandable_segments:True,max_split_size_mb:256"
COUNTS: dict[str, int] = {}
TIMINGS: dict[str, float] = {}
CHILDREN: list = []


def emit(check: str, verdict: str, **fields) -> None:
    COUNTS[verdict] = COUNTS.get(verdict, 0) + 1
    print(json.dumps({"check": check, "verdict": verdict, **fields}, default=str), flush=True)


def short(exc: BaseException, n: int = 400) -> str:
    return f"{type(exc).__name__}: {exc}"[:n]


# ==================================================================================================
# tensors used by every process (torch passed in: nothing imports torch at module level)
# ==================================================================================================


def const_adapter(torch, value: float, device, n: int = 16, numel: int = 64 * 1024, dtype=None) -> dict:
    """``n`` float32 tensors of ``numel`` elements, every element ``value`` (exact below 2**24)."""
    dtype = dtype or torch.float32
    return {
        f"base_model.model.layers.{i}.self_attn.q_proj.lora_A.weight": torch.full(
            (numel // 1024, 1024), float(value), dtype=dtype, device=device
        )
        for i in range(n)
    }


def summarize(torch, tensors: dict) -> dict:
    ts = [t.detach() for t in tensors.values()]
    mins = torch.stack([t.float().amin() for t in ts])
    maxs = torch.stack([t.float().amax() for t in ts])
    sums = torch.stack([t.double().sum() for t in ts])
    return {
        "min": float(mins.min()),
        "max": float(maxs.max()),
        "sum": float(sums.sum()),
        "n": len(ts),
        "device": str(ts[0].device),
    }


def cycles_per_ms(torch) -> float:
    """torch.cuda._sleep cycles per millisecond on this GPU (second measurement, clocks ramped)."""
    rate = 1e6
    for cycles in (20_000_000, 50_000_000):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        rate = cycles / max(start.elapsed_time(end), 1e-3)
    return rate


def percentile(values: list, q: float):
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def segment_of(torch, ptr: int):
    """The allocator segment (snapshot dict) that holds device pointer ``ptr``, or None."""
    for seg in torch.cuda.memory._snapshot()["segments"]:
        if seg["address"] <= ptr < seg["address"] + seg["total_size"]:
            return seg
    return None


def effective_settings(torch) -> dict | None:
    """The allocator's effective settings (not the last string), where this torch reports them."""
    try:
        settings = torch.cuda.memory._snapshot().get("allocator_settings")
    except Exception as exc:  # noqa: BLE001 - report, never fail the probe
        return {"error": short(exc)}
    if not isinstance(settings, dict):
        return None
    keep = ("expandable_segments", "max_split_size", "garbage_collection_threshold", "PYTORCH_CUDA_ALLOC_CONF")
    return {k: settings.get(k) for k in keep if k in settings}


def settings_string(torch) -> str | None:
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    return getter() if getter is not None else None


# ==================================================================================================
# child processes: one dispatcher, two roles
# ==================================================================================================


class Consumer:
    """A process that fetches with AdapterClient (W1-W4)."""

    def __init__(self):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.ones(1, device="cuda").add_(1).item()  # context up before any timing
        from lora_ipc import AdapterClient

        self.AdapterClient = AdapterClient
        self.clients: dict = {}
        self.kept: dict = {}
        self.kept_summary: dict = {}
        self.cpm = None

    def _cpm(self) -> float:
        if self.cpm is None:
            self.cpm = cycles_per_ms(self.torch)
        return self.cpm

    def open(self, key, endpoint, timeout_s=5.0, transport=None):
        self.clients[key] = self.AdapterClient(endpoint, timeout_s=timeout_s, transport=transport)
        return True

    def fetch(self, key, name, version=None, device=None, keep=False):
        client = self.clients[key]
        t0 = time.perf_counter()
        adapter = client.fetch(name, version, device=device)
        ms = (time.perf_counter() - t0) * 1e3
        out = {
            "version": adapter.version,
            **summarize(self.torch, adapter.tensors),
            "ms": round(ms, 3),
            "host_fallbacks": client.host_fallbacks,
        }
        if keep:
            self.kept[key] = adapter
            self.kept_summary[key] = out
        return out

    def close(self, key):
        client = self.clients.pop(key, None)
        t0 = time.perf_counter()
        if client is not None:
            client.close()
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
        return {"close_ms": round((time.perf_counter() - t0) * 1e3, 3), "registry": self.registry()}

    def registry(self):
        from lora_ipc.imports import REGISTRY

        with REGISTRY._lock:
            # keys are ImportKey(endpoint, server_pid, slab_id) since issue 15 (this copy of the probe follows)
            return {getattr(key, "slab_id", key): entry[1] for key, entry in REGISTRY._open.items()}

    def loop(self, key, name, seconds, patch_wait=False):
        """Fetch the newest version for ``seconds``; each version v is the constant v (a torn read shows)."""
        from lora_ipc import LoraIpcError, SlabRecycled

        torch = self.torch
        client = self.clients[key]
        original = torch.cuda.Stream.wait_event
        if patch_wait:
            torch.cuda.Stream.wait_event = lambda self, event: None  # the negative control
        fetches = torn = recycled = 0
        errors: dict = {}
        lat: list = []
        examples: list = []
        versions: list = []
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    adapter = client.fetch(name)
                except SlabRecycled:
                    recycled += 1
                    continue
                except LoraIpcError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    if len(errors) == 1 and errors[type(exc).__name__] == 1:
                        examples.append(short(exc, 200))
                    time.sleep(0.005)
                    continue
                lat.append((time.perf_counter() - t0) * 1e3)
                fetches += 1
                s = summarize(torch, adapter.tensors)
                versions.append(adapter.version)
                if not (s["min"] == s["max"] == float(adapter.version)):
                    torn += 1
                    if len(examples) < 3:
                        examples.append({"version": adapter.version, "min": s["min"], "max": s["max"]})
        finally:
            torch.cuda.Stream.wait_event = original
        return {
            "fetches": fetches,
            "torn": torn,
            "recycled_after_retries": recycled,
            "errors": errors,
            "examples": examples,
            "p50_ms": percentile(lat, 0.5),
            "p99_ms": percentile(lat, 0.99),
            "max_ms": percentile(lat, 1.0),
            "versions": [min(versions), max(versions)] if versions else None,
            "host_fallbacks": client.host_fallbacks,
        }

    def two_clients_race(self, endpoint, name):
        """Two clients of one process fetch a slab this process has not opened yet, at the same instant:
        both replies may carry a handle; the registry must open one and consume the other."""
        barrier = threading.Barrier(2)
        clients = [self.AdapterClient(endpoint, timeout_s=5.0) for _ in range(2)]
        results: list = [None, None]

        def run(i):
            barrier.wait()
            try:
                results[i] = summarize(self.torch, clients[i].fetch(name).tensors)
            except Exception as exc:  # noqa: BLE001
                results[i] = short(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        users = self.registry()
        for c in clients:
            c.close()
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
        return {"results": results, "registry_users_while_open": users, "registry_after_close": self.registry()}

    def busy_fetch(self, key, name, busy_ms):
        torch = self.torch
        client = self.clients[key]
        client.fetch(name)  # imported already: only the copy is measured
        torch.cuda.synchronize()
        torch.cuda._sleep(int(busy_ms * self._cpm()))
        t0 = time.perf_counter()
        adapter = client.fetch(name)
        fetch_ms = (time.perf_counter() - t0) * 1e3
        still_busy = not torch.cuda.current_stream().query()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return {
            "fetch_ms": round(fetch_ms, 3),
            "caller_stream_still_busy_after_fetch": still_busy,
            "caller_work_left_ms": round((time.perf_counter() - t1) * 1e3, 3),
            **summarize(torch, adapter.tensors),
        }

    def release_busy(self, key, name, busy_ms):
        """Drop this process's import (client.close -> registry -> storage deleter) with ``busy_ms`` of work
        queued on the caller's stream: torch's IPC deleter stream-synchronizes the *current* stream."""
        torch = self.torch
        client = self.clients.pop(key)
        client.fetch(name)
        torch.cuda.synchronize()
        torch.cuda._sleep(int(busy_ms * self._cpm()))
        t0 = time.perf_counter()
        client.close()
        gc.collect()
        close_ms = (time.perf_counter() - t0) * 1e3
        still_busy = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
        return {
            "close_ms": round(close_ms, 3),
            "caller_stream_still_busy_after_close": still_busy,
            "registry": self.registry(),
        }

    def first_import_stall(self, key, endpoint, name):
        """First fetch of a slab (an import), then how long this process's current stream stays blocked."""
        torch = self.torch
        client = self.clients[key] = self.AdapterClient(endpoint, timeout_s=10.0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        adapter = client.fetch(name)
        fetch_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        torch.cuda.current_stream().synchronize()
        stall_ms = (time.perf_counter() - t1) * 1e3
        return {
            "fetch_ms": round(fetch_ms, 3),
            "caller_stream_blocked_ms": round(stall_ms, 3),
            **summarize(torch, adapter.tensors),
        }

    def stream_alias(self, creations=40):
        """Is lora_ipc's 'own' copy stream a pooled stream that other code's torch.cuda.Stream() also gets?"""
        torch = self.torch
        from lora_ipc.backends.cuda import copy_stream

        index = torch.cuda.current_device()
        own = copy_stream(index)
        others = [torch.cuda.Stream(index) for _ in range(creations)]
        hits = [i for i, s in enumerate(others) if s.cuda_stream == own.cuda_stream]
        return {"copy_stream": hex(own.cuda_stream), "priority": own.priority, "aliased_by_creation": hits[:5]}

    def exports_cap(self, endpoint, name, rounds):
        """Open a client, fetch (one import = one export), close; repeat. When does the slab stop serving?"""
        first_failure = None
        error = None
        later_failures = 0
        t0 = time.monotonic()
        for i in range(rounds):
            try:
                with self.AdapterClient(endpoint, timeout_s=5.0) as client:
                    client.fetch(name)
            except Exception as exc:  # noqa: BLE001
                if first_failure is None:
                    first_failure, error = i, short(exc)
                else:
                    later_failures += 1
                if later_failures >= 3:
                    break
        gc.collect()
        return {
            "rounds_run": i + 1,
            "first_failure_at": first_failure,
            "error": error,
            "failures_after_first": later_failures,
            "seconds": round(time.monotonic() - t0, 2),
        }

    def open_bad(self, handle):
        from lora_ipc.backends import open_slab

        try:
            open_slab(handle)
        except Exception as exc:  # noqa: BLE001
            return {"raised": type(exc).__name__, "message": str(exc)[:400]}
        return {"raised": None}

    def same_process(self, device):
        """Exporter and client in ONE process (colocated trainer+engine): can the client import?"""
        torch = self.torch
        from lora_ipc import AdapterExporter

        out = {}
        with AdapterExporter(device=device) as exporter:
            exporter.publish("self", const_adapter(torch, 7, device), CONFIG)
            try:
                with self.AdapterClient(exporter.endpoint, transport="cuda") as client:
                    out["cuda_mode"] = summarize(torch, client.fetch("self").tensors)
            except Exception as exc:  # noqa: BLE001
                out["cuda_mode"] = short(exc)
            try:
                with self.AdapterClient(exporter.endpoint, transport="auto") as client:
                    s = summarize(torch, client.fetch("self").tensors)
                    out["auto_mode"] = {**s, "host_fallbacks": client.host_fallbacks}
            except Exception as exc:  # noqa: BLE001
                out["auto_mode"] = short(exc)
        try:
            torch.ones(4, device=device).add_(1).sum().item()
            out["cuda_healthy_after"] = True
        except Exception as exc:  # noqa: BLE001
            out["cuda_healthy_after"] = short(exc)
        return out

    # ---- exporter SIGKILLed while this process still maps its slab -------------------------------

    def _dead_slabs(self, pid):
        from lora_ipc.imports import REGISTRY

        with REGISTRY._lock:
            return [
                e[0] for key, e in REGISTRY._open.items() if getattr(key, "slab_id", key).startswith(f"cuda.{pid}.")
            ]

    def sk_owned(self, key):
        now = summarize(self.torch, self.kept[key].tensors)
        before = self.kept_summary[key]
        return {"owned_intact": (now["min"], now["max"], now["sum"]) == (before["min"], before["max"], before["sum"])}

    def sk_fetch(self, key, name):
        from lora_ipc import LoraIpcError

        t0 = time.perf_counter()
        try:
            self.clients[key].fetch(name)
            raised = None
        except LoraIpcError as exc:
            raised = short(exc, 200)
        return {"raised": raised, "seconds": round(time.perf_counter() - t0, 2)}

    def sk_read_mapping(self, pid):
        slabs = self._dead_slabs(pid)
        if not slabs:
            return {"mapped_slabs": 0}
        t0 = time.perf_counter()
        try:
            value = float(slabs[0].tensor[: 1 << 20].view(self.torch.float32).sum().item())
            res = {"read_sum_first_MiB": value}
        except Exception as exc:  # noqa: BLE001
            res = {"read_error": short(exc)}
        return {"mapped_slabs": len(slabs), **res, "ms": round((time.perf_counter() - t0) * 1e3, 1)}

    def sk_copy_out(self, pid):
        slabs = self._dead_slabs(pid)
        if not slabs:
            return {"mapped_slabs": 0}
        t0 = time.perf_counter()
        try:
            owned = slabs[0].copy_out(1 << 20)  # waits on the dead exporter's interprocess event
            res = {"copy_sum_first_MiB": float(owned.view(self.torch.float32).sum().item())}
        except Exception as exc:  # noqa: BLE001
            res = {"copy_error": short(exc)}
        return {**res, "ms": round((time.perf_counter() - t0) * 1e3, 1)}

    def sk_drop_owned(self, key):
        self.kept.pop(key, None)
        gc.collect()
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()
        return True

    def sk_health(self):
        try:
            return {"fresh_op": float(self.torch.ones(8, device="cuda").mul_(2).sum().item())}
        except Exception as exc:  # noqa: BLE001
            return {"fresh_op_error": short(exc)}


class Trainer:
    """A spawned trainer (X) whose environment sets PYTORCH_CUDA_ALLOC_CONF before torch loads."""

    def __init__(self):
        import torch

        self.torch = torch
        self.string_at_import = settings_string(torch)
        torch.ones(1, device="cuda").add_(1).item()
        from lora_ipc import AdapterExporter

        self.exporter = AdapterExporter(keep=2, device="cuda:0")
        self.hold: list = []

    def info(self):
        return {
            "endpoint": self.exporter.endpoint,
            "pid": os.getpid(),
            "string_at_import": self.string_at_import,
            "env": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        }

    def settings(self):
        return {"string": settings_string(self.torch), "effective": effective_settings(self.torch)}

    def alloc_is_expandable(self, mib):
        t = self.torch.empty(mib * MiB, dtype=self.torch.uint8, device="cuda:0")
        self.hold.append(t)
        seg = segment_of(self.torch, t.data_ptr())
        return None if seg is None else bool(seg.get("is_expandable"))

    def publish_const(self, name, value, n, numel):
        torch = self.torch
        tensors = const_adapter(torch, value, "cuda:0", n=n, numel=numel)
        version = self.exporter.publish(name, tensors, CONFIG)
        del tensors
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # only the slab (and this process's context) stays on the device
        from lora_ipc.backends.cuda import HANDLE_KIND_OFFSET

        slabs = self.exporter.store.pool.slabs()
        kinds = sorted({chr(s.handle.storage_handle[HANDLE_KIND_OFFSET]) for s in slabs if s.device.type == "cuda"})
        seg = segment_of(torch, slabs[-1].tensor.data_ptr()) if slabs else None
        return {
            "version": version,
            "handle_kinds": kinds,
            "slab_segment_expandable": None if seg is None else bool(seg.get("is_expandable")),
        }

    def incremental(self):
        """Settings set in two calls: the last string no longer names expandable_segments, which stays on."""
        torch = self.torch
        setter = (
            getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
        )
        setter("expandable_segments:True")
        setter("max_split_size_mb:256")
        out = {"string": settings_string(torch), "effective": effective_settings(torch)}
        from lora_ipc.backends.cuda import HANDLE_KIND_OFFSET, CudaBackend

        try:
            slab = CudaBackend("cuda:0").allocate(4 * MiB)
            out["allocate"] = "ok"
            out["kind"] = chr(slab.handle.storage_handle[HANDLE_KIND_OFFSET])
            self.hold.append(slab)
        except Exception as exc:  # noqa: BLE001
            out["allocate"] = short(exc, 300)
        return out


def _child_main(conn, role):
    try:
        obj = Consumer() if role == "consumer" else Trainer()
    except BaseException as exc:  # noqa: BLE001
        conn.send(("err", short(exc, 800), traceback.format_exc(limit=8)))
        return
    conn.send(("ok", {"pid": os.getpid()}))
    while True:
        try:
            cmd, args = conn.recv()
        except (EOFError, OSError):
            return
        if cmd == "exit":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(obj, cmd)(*args)))
        except BaseException as exc:  # noqa: BLE001
            conn.send(("err", short(exc, 800), traceback.format_exc(limit=8)))


class ChildError(RuntimeError):
    def __init__(self, message, tb):
        super().__init__(message)
        self.tb = tb


class Proc:
    def __init__(self, ctx, name, role, env=None):
        self.name = name
        self.conn, child = ctx.Pipe()
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            self.proc = ctx.Process(target=_child_main, args=(child, role), name=name, daemon=True)
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self.pid = self.proc.pid
        self.ready = None
        CHILDREN.append(self)

    def wait_ready(self, timeout):
        self.ready = self._recv(timeout, "start")
        return self.ready

    def send(self, cmd, *args):
        self.conn.send((cmd, args))

    def _recv(self, timeout, what):
        if not self.conn.poll(timeout):
            self.kill()  # a late answer would be read as the next call's: this process is done
            self.ready = None
            raise TimeoutError(f"{self.name}: {what} did not answer within {timeout}s (process killed)")
        status, *rest = self.conn.recv()
        if status == "ok":
            return rest[0]
        raise ChildError(f"{self.name}.{what}: {rest[0]}", rest[1])

    def result(self, cmd, timeout=60):
        return self._recv(timeout, cmd)

    def call(self, cmd, *args, timeout=60):
        self.send(cmd, *args)
        return self._recv(timeout, cmd)

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.join(10)

    def stop(self):
        if self.proc.is_alive():
            try:
                self.call("exit", timeout=10)
            except Exception:  # noqa: BLE001
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.kill()


# ==================================================================================================
# the trainer side (this process)
# ==================================================================================================


class Lab:
    def __init__(self, torch, device, selftest):
        self.torch = torch
        self.device = device
        self.cuda = device.startswith("cuda")
        self.selftest = selftest
        self.exporters: list = []
        self.cpm = cycles_per_ms(torch) if self.cuda else None
        self.slab_bytes = 16 * 64 * 1024 * 4  # const_adapter default: 16 x 256 KiB float32 = 4 MiB

    def exporter(self, keep=2, max_free=None):
        from lora_ipc import AdapterExporter

        ex = AdapterExporter(keep=keep, device=self.device)
        if max_free is not None:
            ex.store.pool.max_free = max_free
        self.exporters.append(ex)
        return ex

    def const(self, value, **kw):
        return const_adapter(self.torch, value, self.device, **kw)

    def settle(self):
        gc.collect()
        if not self.cuda:
            return (0, 0)
        self.torch.cuda.synchronize()
        self.torch.cuda.ipc_collect()
        gc.collect()
        return (self.torch.cuda.memory_allocated(0), self.torch.cuda.memory_reserved(0))

    def slabs_of(self, ex):
        return [s for s in ex.store.pool.slabs() if s.device.type == "cuda"]

    def sleep_gpu(self, ms):
        self.torch.cuda._sleep(int(ms * self.cpm))


def mib(n):
    return round(n / MiB, 2)


def check_handles_and_unimported_leak(lab):
    """P1: every export must be imported exactly once; one that never is pins its slab forever."""
    torch = lab.torch
    from lora_ipc.backends.cuda import HANDLE_KIND_OFFSET, CudaBackend

    base = lab.settle()
    backend = CudaBackend(lab.device)
    slabs = [backend.allocate(8 * MiB) for _ in range(4)]
    h = [slabs[0].handle_for_import() for _ in range(3)]  # the first is the eager export, then 2 fresh
    raw = h[0].storage_handle
    same = all(x.storage_handle == raw for x in h)
    emit(
        "handle_bytes",
        "pass" if raw[HANDLE_KIND_OFFSET : HANDLE_KIND_OFFSET + 1] == b"c" and same else "fail",
        expect="kind byte 'c'; the same storage-handle bytes on every export of one slab (consume() relies on "
        "torch's (handle, offset) cache hit); distinct ref-counter slots",
        length=len(raw),
        version_byte=raw[0],
        kind=chr(raw[HANDLE_KIND_OFFSET]),
        same_bytes_across_exports=same,
        ref_counter_offsets=[x.ref_counter_offset for x in h],
        event_sync_required=h[0].event_sync_required,
        storage_offset_bytes=h[0].storage_offset_bytes,
        exports_on_slab=slabs[0]._exports,
        torch=torch.__version__,
    )
    for s in slabs:
        s.close()
    del slabs, h
    after = lab.settle()
    leaked = after[0] - base[0]
    emit(
        "leak_closed_never_imported",
        "fail" if leaked >= 16 * MiB else ("pass" if leaked == 0 else "info"),
        expect="PREDICTED BUG P1: 4 slabs x 8 MiB closed without any import stay allocated (torch parks a "
        "storage whose export counter is still 1 in its limbo; ipc_collect never frees it)",
        leaked_allocated_mib=mib(leaked),
        leaked_reserved_mib=mib(after[1] - base[1]),
    )

    # the remedy: the exporter releases the counter of an export nobody imported, before closing
    base = lab.settle()
    slab = backend.allocate(8 * MiB)
    torch.UntypedStorage._release_ipc_counter_cuda(slab.handle.ref_counter_handle, slab.handle.ref_counter_offset)
    slab.close()
    del slab
    after = lab.settle()
    emit(
        "remedy_release_unimported_counter",
        "pass" if after[0] == base[0] else "fail",
        expect="fix check: the exporter calling torch.UntypedStorage._release_ipc_counter_cuda(ref_counter_handle, "
        "ref_counter_offset) for its never-imported export before close() frees the slab (0 MiB left)",
        leaked_allocated_mib=mib(after[0] - base[0]),
    )

    ex = lab.exporter(keep=1, max_free=0)
    base = lab.settle()
    for v in range(1, 5):
        ex.publish("unfetched", lab.const(v), CONFIG)
    ex.close()
    lab.exporters.remove(ex)
    after = lab.settle()
    leaked = after[0] - base[0]
    emit(
        "leak_store_slabs_never_fetched",
        "fail" if leaked >= 3 * lab.slab_bytes else ("pass" if leaked == 0 else "info"),
        expect="P1 through the store: 4 versions published, never fetched, exporter closed -> 4 x 4 MiB stay "
        "allocated (the eager first export of each slab is never imported)",
        leaked_allocated_mib=mib(leaked),
        leaked_reserved_mib=mib(after[1] - base[1]),
    )


def check_refcount_control(lab, w1):
    """The ref-count path that must work: one import, released, then the slab closes (or closes first)."""
    ex = lab.exporter(keep=1, max_free=0)
    slab = lab.slab_bytes
    base = lab.settle()
    ex.publish("ctl", lab.const(1), CONFIG)
    w1.call("open", "ctl", ex.endpoint)
    r1 = w1.call("fetch", "ctl", "ctl")
    w1.call("close", "ctl")
    ex.publish("ctl", lab.const(2), CONFIG)  # v1's slab closes now: its one export was imported and released
    time.sleep(0.2)
    a1 = lab.settle()
    w1.call("open", "ctl", ex.endpoint)
    r2 = w1.call("fetch", "ctl", "ctl")
    ex.publish("ctl", lab.const(3), CONFIG)  # v2's slab closes while W1 still maps it -> limbo
    time.sleep(0.2)
    a2 = lab.settle()
    w1.call("close", "ctl")
    a3 = lab.settle()
    d = [round((a[0] - base[0]) / slab, 2) for a in (a1, a2, a3)]
    ok = r1["min"] == r1["max"] == 1 and r2["min"] == r2["max"] == 2 and d == [1.0, 2.0, 1.0]
    emit(
        "refcount_import_once",
        "pass" if ok else "fail",
        expect="slabs in use after: close-after-release 1, close-while-mapped 2 (limbo), importer released + "
        "ipc_collect 1; fetched values exact",
        slabs_allocated=d,
        values=[(r1["min"], r1["max"]), (r2["min"], r2["max"])],
    )
    ex.close()
    lab.exporters.remove(ex)
    a4 = lab.settle()
    emit(
        "leak_on_store_close_unfetched_version",
        "fail" if a4[0] - base[0] >= slab else "pass",
        expect="P1 again: v3 was never fetched, so closing the exporter leaves its slab allocated",
        leaked_slabs=round((a4[0] - base[0]) / slab, 2),
    )


def check_multi_importers(lab, ws):
    ex = lab.exporter(keep=1, max_free=0)
    base = lab.settle()
    ex.publish("multi", lab.const(5), CONFIG)
    slab = lab.slabs_of(ex)[0] if lab.cuda else None
    ws[0].send("two_clients_race", ex.endpoint, "multi")  # W1: a process that has not opened the slab yet
    for w in ws[1:]:
        w.call("open", "m", ex.endpoint)
        w.send("fetch", "m", "multi")
    race = ws[0].result("two_clients_race")
    fetched = [w.result("fetch") for w in ws[1:]]
    w1 = ws[0].call("open", "m", ex.endpoint) and ws[0].call("fetch", "m", "multi")  # W1 again, fresh client
    exports = slab._exports if slab is not None else None
    for w in ws:
        w.call("close", "m")
    ex.publish("multi", lab.const(6), CONFIG)  # closes v1's slab: every export must be back at 0
    time.sleep(0.2)
    after = lab.settle()
    values_ok = all(r["min"] == r["max"] == 5 for r in fetched + [w1]) and all(
        isinstance(r, dict) and r["min"] == r["max"] == 5 for r in race["results"]
    )
    in_use = round((after[0] - base[0]) / lab.slab_bytes, 2) if lab.cuda else None
    verdict = "pass" if values_ok and (in_use in (None, 1.0)) else "fail"
    emit(
        "multi_importers_same_slab",
        verdict,
        expect="3 processes + 2 racing clients in one of them read exact bytes (4 imports = 4 exports; a 5th "
        "export is a surplus handle the registry must consume); after all close, closing the slab "
        "frees it (1 slab = v2 left)",
        exports_made=exports,
        surplus_handles_consumed=None if exports is None else exports - 4,
        race=race,
        values_ok=values_ok,
        slabs_in_use_after=in_use,
    )
    ex.close()
    lab.exporters.remove(ex)


def check_fast_publish(lab, ws, seconds=6.0, control_seconds=3.0):
    ex = lab.exporter(keep=2)
    name = "fast"
    ex.publish(name, lab.const(1), CONFIG)
    stop = threading.Event()
    stats = {"publishes": 1, "error": None}
    base = lab.settle()

    def publisher():
        v = 1
        try:
            while not stop.is_set():
                v += 1
                if lab.cuda:
                    lab.sleep_gpu(2)  # the pack queues ~2 ms behind GPU work: only the ready event orders the copy
                got = ex.publish(name, lab.const(v), CONFIG)
                if got != v:
                    raise RuntimeError(f"published {got}, expected {v}")
                stats["publishes"] += 1
                time.sleep(0.002)
        except Exception as exc:  # noqa: BLE001
            stats["error"] = short(exc)

    thread = threading.Thread(target=publisher, daemon=True)
    thread.start()
    for w in ws:
        w.call("open", "f", ex.endpoint)
    for w in ws:
        w.send("loop", "f", name, seconds)
    results = [w.result("loop", timeout=seconds + 60) for w in ws]
    torn = sum(r["torn"] for r in results)
    errors = sum(sum(r["errors"].values()) for r in results)
    emit(
        "fast_publish_fetch",
        "pass" if torn == 0 and errors == 0 and not stats["error"] else "fail",
        expect="3 consumers fetching the newest version while the trainer publishes every ~4 ms (each pack "
        "queued 2 ms behind GPU work): no torn adapter, no error",
        seconds=seconds,
        publishes=stats["publishes"],
        publisher_error=stats["error"],
        consumers=results,
        store=__import__("msgspec").to_builtins(ex.store.status())["metrics"],  # lora_ipc: status is a Struct now
        max_exports_per_slab=max((s._exports for s in lab.slabs_of(ex)), default=None) if lab.cuda else None,
        allocated_mib_during=mib(lab.settle()[0] - base[0]),
    )
    if lab.cuda:
        r = ws[-1].call("loop", "f", name, control_seconds, True, timeout=control_seconds + 60)
        emit(
            "fast_publish_without_event_wait",
            "pass" if r["torn"] > 0 else "fail",
            expect="sensitivity control: the same loop with Stream.wait_event patched out MUST see torn reads "
            "(else the check above proves nothing)",
            consumer=r,
        )
    else:
        emit("fast_publish_without_event_wait", "skip", reason="CPU slabs have no event")
    stop.set()
    thread.join(30)
    for w in ws:
        w.call("close", "f")
    ex.close()
    lab.exporters.remove(ex)


def check_caller_stream(lab, w1, w2, w3):
    torch = lab.torch
    ex = lab.exporter(keep=2)
    ex.publish("side", lab.const(9), CONFIG)
    w1.call("open", "b", ex.endpoint)
    r = w1.call("busy_fetch", "b", "side", 60)
    emit(
        "fetch_with_busy_caller_stream",
        "pass"
        if r["caller_stream_still_busy_after_fetch"] and r["fetch_ms"] < 30 and r["min"] == r["max"] == 9
        else "fail",
        expect="~60 ms queued on the caller's stream: the fetch returns in a few ms and the work is still running",
        **r,
    )
    r = w1.call("release_busy", "b", "side", 60)
    emit(
        "import_release_syncs_caller_stream",
        "fail" if r["close_ms"] > 30 else "pass",
        expect="PREDICTED P4: dropping an import runs torch's IPC deleter, which stream_synchronize()s the "
        "CURRENT stream: close (or _forget_dead_slabs inside a fetch) blocks ~60 ms on the caller's work",
        **r,
    )
    # first import: torch's _new_shared_cuda makes the caller's current stream wait on the export event,
    # recorded by the trainer's server thread on the trainer's default stream
    ex2 = lab.exporter(keep=2)
    ex2.publish("stall", lab.const(11), CONFIG)
    w3.call("open", "s0", ex2.endpoint)
    w3.call("fetch", "s0", "stall")  # W3 takes the slab's eager export (recorded at allocation, long done)
    torch.cuda.synchronize()
    lab.sleep_gpu(400)  # trainer's default stream busy for ~400 ms
    r = w2.call("first_import_stall", "s", ex2.endpoint, "stall")  # a fresh export, recorded behind the sleep
    torch.cuda.synchronize()
    w3.call("close", "s0")
    emit(
        "first_import_waits_on_trainer_stream",
        "fail" if r["caller_stream_blocked_ms"] > 100 else "pass",
        expect="PREDICTED P5: the engine's current stream is blocked until the trainer's default stream drains "
        "(export event), ~350 ms here, although the fetch itself returns at once",
        **r,
    )
    w2.call("close", "s")
    ex.close()
    ex2.close()
    lab.exporters.remove(ex)
    lab.exporters.remove(ex2)
    r = w1.call("stream_alias")
    emit(
        "copy_stream_is_pooled",
        "fail" if r["aliased_by_creation"] else "pass",
        expect="P6 (perf): torch.cuda.Stream() hands out 32 pooled streams round-robin, so the 'own' copy stream "
        "is shared with any other code's torch.cuda.Stream() after <= 32 creations",
        **r,
    )


def check_exports_cap(lab, w2, rounds=300):
    ex = lab.exporter(keep=2)
    ex.publish("cap", lab.const(1), CONFIG)
    r = w2.call("exports_cap", ex.endpoint, "cap", rounds, timeout=180)
    slabs = lab.slabs_of(ex)
    emit(
        "exports_cap_per_slab",
        "fail" if r["first_failure_at"] is not None else "pass",
        expect="P7 (liveness): every re-import (new client, engine restart, LRU eviction) costs one export; at "
        "MAX_EXPORTS_PER_SLAB=256 the slab refuses every later importer with LimitExceeded, for good",
        **r,
        exports_on_slab=[s._exports for s in slabs],
    )
    ex.close()
    lab.exporters.remove(ex)


def check_host_fallback(lab, w4):
    torch = lab.torch
    ex = lab.exporter(keep=1, max_free=3)  # room for A, B and their host copies on the free list
    slab = lab.slab_bytes
    base = lab.settle()
    ex.publish("h", lab.const(21), CONFIG)  # v1 in slab A
    slab_a = lab.slabs_of(ex)[0].slab_id
    w4.call("open", "h", ex.endpoint, 10.0, "auto")
    r1 = w4.call("fetch", "h", "h")  # the reply carries A's CUDA handle; W4 cannot import it -> host copy
    emit(
        "host_fallback_no_visible_gpu",
        "pass" if r1["host_fallbacks"] == 1 and r1["min"] == r1["max"] == 21 else "fail",
        expect="a consumer that sees no GPU falls back to the host copy once, with exact bytes",
        **r1,
    )
    ex.publish("h", lab.const(22), CONFIG)  # v2 in slab B, packed on the default stream; A goes to the free list
    r1b = w4.call("fetch", "h", "h")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # a trainer that publishes from a side stream (non-blocking w.r.t. stream 0)
        tensors = lab.const(23)  # allocated before the sleep: nothing in publish() below can synchronize
        lab.sleep_gpu(300)
        ex.publish("h", tensors, CONFIG)  # v3 reuses slab A (still holding v1's 21s); its pack waits ~300 ms
    reused_a = ex.store._versions["h"][3].slab.slab_id == slab_a
    r2 = w4.call("fetch", "h", "h")
    torch.cuda.synchronize()
    r3 = w4.call("fetch", "h", "h")
    torn = not (r2["min"] == r2["max"] == 23)
    emit(
        "host_staging_ignores_ready_event",
        "fail" if torn else "pass",
        expect="PREDICTED P3: stage_to_host copies GPU->host on the server thread's default stream without "
        "waiting on the slab's ready event; a pack queued on a side stream is not done -> the host copy "
        "holds v1's 21s (or a mix), and it is cached for the whole version (refetch after sync: same)",
        default_stream_control=r1b,
        side_stream_first_fetch=r2,
        refetch_after_sync=r3,
        v3_reused_slab_a=reused_a,
    )
    w4.call("close", "h")
    time.sleep(0.3)
    ex.close()
    lab.exporters.remove(ex)
    after = lab.settle()
    leaked = round((after[0] - base[0]) / slab, 2)
    emit(
        "leak_after_fallback",
        "fail" if leaked >= 1 else "pass",
        expect="P1b: the CUDA handle of the reply whose import failed (slab A) and the eager export of slab B "
        "(never fetched over CUDA) are never released: after the exporter closes, 2 slabs stay allocated",
        slabs_left_allocated=leaked,
    )


def check_bad_handle(lab, w1):
    import msgspec

    from lora_ipc.backends.cuda import CudaBackend

    slab = CudaBackend(lab.device).allocate(1 * MiB)
    h = slab.handle_for_import()
    bad = msgspec.structs.replace(h, slab_id="bad-version", storage_handle=b"\xff" + h.storage_handle[1:])
    r = w1.call("open_bad", bad)
    emit(
        "refused_handle_version",
        "pass" if r["raised"] == "BackendError" and "torch" in r.get("message", "") else "fail",
        expect="a handle with a future version byte is a BackendError naming torch, not a crash",
        real_version_byte=h.storage_handle[0],
        **r,
    )
    lab.keep_alive = slab  # its export was never imported: deliberately left (it would park in limbo)


def check_exporter_process(lab, x, w3):
    torch = lab.torch
    info = x.ready_info
    s0 = x.call("settings")
    e0 = x.call("alloc_is_expandable", 64)
    free_a = torch.cuda.mem_get_info(0)[0]
    pub = x.call("publish_const", "k", 3, 16, 16 * MiB)  # 16 x 64 MiB = 1 GiB slab
    free_b = torch.cuda.mem_get_info(0)[0]
    s1 = x.call("settings")
    e1 = x.call("alloc_is_expandable", 96)
    broken = (
        s0["string"] != s1["string"]
        or s0["effective"] != s1["effective"]
        or (e0 is True and e1 is False)
        or pub["handle_kinds"] != ["c"]
        or pub["slab_segment_expandable"] is True
    )
    known = e0 is not None and e1 is not None and pub["slab_segment_expandable"] is not None
    emit(
        "allocator_settings_restored",
        "fail" if broken else ("pass" if known else "info"),
        expect=f"trainer started with PYTORCH_CUDA_ALLOC_CONF={ALLOC_ENV}: after a publish the settings string "
        "AND the effective settings are unchanged, new trainer allocations are still expandable, the "
        "slab itself is a plain cudaMalloc segment ('c')",
        start=info,
        before=s0,
        after=s1,
        trainer_alloc_expandable_before=e0,
        trainer_alloc_expandable_after=e1,
        publish=pub,
        slab_plus_context_mib=mib(free_a - free_b),
    )
    w3.call("open", "x", info["endpoint"], 2.0)
    got = w3.call("fetch", "x", "k", None, None, True)
    inc = x.call("incremental")
    emit(
        "allocator_settings_incremental",
        "fail" if inc.get("allocate") != "ok" or inc.get("kind") != "c" else "pass",
        expect="PREDICTED P2: settings set in two calls (expandable_segments:True, then max_split_size_mb:256) "
        "leave expandable on while the last string omits it; plain_segments() reads the string, does "
        "not switch it off, and the slab export fails (kind 'e' -> BackendError)",
        **inc,
    )
    # ---- SIGKILL the exporter while W3 maps its 1 GiB slab and owns a copy -----------------------------------
    free_c = torch.cuda.mem_get_info(0)[0]
    shm_before = glob.glob(f"/dev/shm/torch_{x.pid}_*")
    x.kill()
    time.sleep(1.5)
    free_d = torch.cuda.mem_get_info(0)[0]
    res = {
        "fetched_before_kill": {k: got[k] for k in ("version", "min", "max")},
        "trainer_ref_counter_files_before": len(shm_before),
    }
    for cmd, args, t in (
        ("sk_owned", ("x",), 30),
        ("sk_fetch", ("x", "k"), 30),
        ("sk_read_mapping", (x.pid,), 30),
        ("sk_copy_out", (x.pid,), 30),
    ):
        try:
            res[cmd] = w3.call(cmd, *args, timeout=t)
        except TimeoutError as exc:
            res[cmd] = f"HANG: {exc}"
            break
        except ChildError as exc:
            res[cmd] = str(exc)
    res["free_mib_freed_by_kill"] = mib(free_d - free_c)
    try:
        w3.call("sk_drop_owned", "x", timeout=30)
        free_e = torch.cuda.mem_get_info(0)[0]
        res["close_import"] = w3.call("close", "x", timeout=30)
        time.sleep(0.5)
        free_f = torch.cuda.mem_get_info(0)[0]
        res["free_mib_freed_by_closing_the_import"] = mib(free_f - free_e)
        res["health_after"] = w3.call("sk_health", timeout=30)
    except Exception as exc:  # noqa: BLE001
        res["after_kill_error"] = short(exc)
    res["dead_trainer_ref_counter_files_left"] = len(glob.glob(f"/dev/shm/torch_{x.pid}_*"))
    intact = isinstance(res.get("sk_owned"), dict) and res["sk_owned"]["owned_intact"]
    raised = isinstance(res.get("sk_fetch"), dict) and res["sk_fetch"]["raised"] is not None
    emit(
        "exporter_sigkilled_while_mapped",
        "pass" if intact and raised and "HANG" not in json.dumps(res) else "fail",
        expect="owned tensors intact; next fetch raises ExporterUnavailable in ~2 s; reading/copying the dead "
        "mapping neither hangs nor poisons the context. Info: whether ~1 GiB comes back at the kill "
        "(driver frees it under the importer) or only when the importer closes its mapping",
        **res,
    )


def check_same_process(lab, w1):
    r = w1.call("same_process", "cuda:0", timeout=60)
    imported = isinstance(r.get("cuda_mode"), dict)
    emit(
        "same_process_import",
        "pass" if imported else "fail",
        expect="P8 (colocated trainer+engine): a client in the exporting process cannot cudaIpcOpenMemHandle its "
        "own allocation; transport=cuda errors (with a misleading 'newer torch' hint when the text says "
        "'invalid'), auto silently falls back to the host copy",
        **r,
    )


# ==================================================================================================
# main
# ==================================================================================================


def preflight(args):
    """Returns torch or exits 2 with one clear line."""

    def cannot(reason, **more):
        emit("preflight", "skip", reason=reason, **more)
        print(f"gpu_review_probe: {reason}", file=sys.stderr, flush=True)
        sys.exit(2)

    repo = os.path.abspath(args.repo or os.environ.get("LORA_IPC_REPO") or os.getcwd())
    if repo not in sys.path:
        sys.path.insert(0, repo)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    for var in ("LORA_IPC_ENDPOINT", "LORA_IPC_TRANSPORT"):
        os.environ.pop(var, None)
    try:
        import torch
    except ImportError as exc:
        cannot(f"torch is not importable ({exc})")
    if not args.selftest_cpu and not torch.cuda.is_available():
        cannot(
            f"no CUDA: torch {torch.__version__} sees no GPU; this probe needs one (nothing was run). "
            "Use --selftest-cpu to check the probe's own plumbing on CPU."
        )
    if args.wheels:
        site = "/tmp/lora-ipc-probe-site"
        wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
        if wheels:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-index",
                    "--no-deps",
                    "--no-compile",
                    "--no-cache-dir",
                    "--upgrade",
                    "--target",
                    site,
                    *wheels,
                ],
                check=False,
            )
            sys.path.insert(0, site)
            os.environ["PYTHONPATH"] = site + os.pathsep + os.environ["PYTHONPATH"]
    missing = []
    for module in ("zmq", "msgpack"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        cannot(
            f"not importable: {missing} (pyzmq/msgpack are lora_ipc dependencies; on the device carry "
            "their wheels, e.g. `pip download --no-deps --only-binary=:all: --python-version 3.12 "
            "--platform manylinux_2_28_x86_64 -d .whl pyzmq`, and pass --wheels .whl)"
        )
    try:
        import lora_ipc  # noqa: F401
        from lora_ipc import AdapterClient, AdapterExporter  # noqa: F401
        from lora_ipc.imports import REGISTRY  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        cannot(f"lora_ipc (current API) not importable from {repo}: {short(exc)}")
    return torch, repo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", help="lora_ipc checkout (default $LORA_IPC_REPO or the current directory)")
    ap.add_argument("--wheels", help="directory of wheels to install offline into a private --target first")
    ap.add_argument("--deadline", type=int, default=220, help="seconds before the watchdog ends the probe")
    ap.add_argument("--selftest-cpu", action="store_true", help="only the plumbing, on CPU slabs")
    args = ap.parse_args(argv)
    started = time.monotonic()
    torch, repo = preflight(args)
    import multiprocessing as mp

    def watchdog(signum, frame):
        emit("watchdog", "error", reason=f"deadline {args.deadline}s passed", counts=dict(COUNTS))
        for c in CHILDREN:
            c.kill()
        os._exit(1)

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(args.deadline)
    device = "cpu" if args.selftest_cpu else "cuda:0"
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "repo": repo, "python": sys.version.split()[0]}
    if device.startswith("cuda"):
        env |= {
            "gpu": torch.cuda.get_device_name(0),
            "devices": torch.cuda.device_count(),
            "has_accelerator_settings_getter": hasattr(torch._C, "_accelerator_getAllocatorSettings"),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
    try:
        import msgpack
        import zmq

        env |= {"pyzmq": zmq.__version__, "msgpack": ".".join(map(str, msgpack.version))}
    except Exception:  # noqa: BLE001
        pass
    emit("env", "info", **env)

    ctx = mp.get_context("spawn")
    ws = [Proc(ctx, f"W{i}", "consumer") for i in (1, 2, 3)]
    w4 = x = None
    if not args.selftest_cpu:
        w4 = Proc(ctx, "W4", "consumer", env={"CUDA_VISIBLE_DEVICES": ""})
        x = Proc(ctx, "X", "trainer", env={"PYTORCH_CUDA_ALLOC_CONF": ALLOC_ENV})
    lab = Lab(torch, device, args.selftest_cpu)
    if lab.cuda:
        torch.ones(1, device=device).add_(1).item()
    procs = ws + [p for p in (w4, x) if p is not None]
    for p in procs:
        try:
            p.wait_ready(120)
        except Exception as exc:  # noqa: BLE001
            emit(f"start_{p.name}", "error", error=short(exc, 800), traceback=getattr(exc, "tb", None))
    ok = {p.name: p.ready is not None for p in procs}
    emit(
        "processes",
        "info",
        started=ok,
        seconds=round(time.monotonic() - started, 1),
        cycles_per_ms=None if lab.cpm is None else round(lab.cpm),
    )
    if x is not None and x.ready is not None:
        try:
            x.ready_info = x.call("info")
        except Exception as exc:  # noqa: BLE001
            x.ready = None
            emit("start_X", "error", error=short(exc))

    def run(name, fn, *needs, cuda_only=True):
        if cuda_only and not lab.cuda:
            emit(name, "skip", reason="CUDA-only check (--selftest-cpu)")
            return
        if any(p is None or p.ready is None for p in needs):
            emit(name, "error", error="a process this check needs did not start")
            return
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            emit(
                name,
                "error",
                error=short(exc, 800),
                traceback=getattr(exc, "tb", None) or traceback.format_exc(limit=6),
            )
        finally:
            TIMINGS[name] = round(time.monotonic() - t0, 2)

    w1, w2, w3 = ws
    run("handles_and_unimported_leak", lambda: check_handles_and_unimported_leak(lab))
    run("refcount_control", lambda: check_refcount_control(lab, w1), w1)
    run("multi_importers", lambda: check_multi_importers(lab, ws), *ws, cuda_only=False)
    run("fast_publish", lambda: check_fast_publish(lab, ws), *ws, cuda_only=False)
    run("caller_stream", lambda: check_caller_stream(lab, w1, w2, w3), w1, w2, w3)
    run("exports_cap", lambda: check_exports_cap(lab, w2), w2)
    run("host_fallback", lambda: check_host_fallback(lab, w4), w4)
    run("bad_handle", lambda: check_bad_handle(lab, w1), w1)
    run("exporter_process", lambda: check_exporter_process(lab, x, w3), x, w3)
    run("same_process", lambda: check_same_process(lab, w1), w1)  # last: a failed self-import may leave an error

    for ex in list(lab.exporters):
        try:
            ex.close()
        except Exception:  # noqa: BLE001
            pass
    for p in procs:
        p.stop()
    signal.alarm(0)
    emit(
        "summary", "info", counts=dict(COUNTS), seconds=round(time.monotonic() - started, 1), seconds_per_check=TIMINGS
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
