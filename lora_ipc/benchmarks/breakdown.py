"""Where every millisecond of an adapter swap goes: ``lora-ipc bench --breakdown``.

    lora-ipc bench --breakdown --device cpu --ranks 16,64 --layers 2,8      # a real vLLM engine per layer count
    lora-ipc bench --breakdown --engine none --device cuda                  # transport stages only (no vLLM)

With an engine (``--engine vllm``, the default where vLLM is installed) each iteration times three swaps of
one adapter version into the same running engine, interleaved:

  lora_ipc  trainer pack/publish (``AdapterExporter.publish`` of a PeftModel) | request round trip | slab
            import (descriptor passing: non-zero on a first fetch only) | copy into owned memory | lease
            release | unpack | vLLM ``PEFTHelper`` | ``from_lora_tensors`` | activation into the LoRA slots |
            engine RPC (vLLM's driver-to-worker call, less the worker's time) | prefix-cache reset
  disk      ``save_pretrained`` to /dev/shm | vLLM's own load from disk (``_load_adapter``) | activation |
            engine RPC | prefix-cache reset
  floor     tensors the worker already holds: ``PEFTHelper`` | ``from_lora_tensors`` | activation | engine
            RPC | prefix-cache reset (what no transport can beat)

and, once per iteration, the swap end to end through the public path (``add_lora`` with a ``lora-ipc://``
URI; ``llm_engine.add_lora`` with the saved directory) as a check on the stage sums. Without an engine
(``--engine none``, Llama-7B LoRA shapes) a consumer process fetches with ``AdapterClient``: the transport's
stages, beside the two-warm-copy floor (pack + one copy out) timed in the trainer in the same run.

Writes JSON (``--json``) and a stacked-bar PNG (``--png``): date, hardware, torch and vLLM versions.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import time
from typing import Any

from ..core.memory.host_buffers import HOST_BUFFERS
from .timing import now, percentile, save_json

CONSUMER_TIMEOUT_S = 60.0  # the transport benchmark's consumer answers each fetch within this, or the run fails
# (a consumer that died fails the run at once: its pipe reads EOF)
_lora_ids = itertools.count(1)  # every LoRA id this process gives the engine: never one twice

STAGES = {
    "lora_ipc": (
        "publish_ms",
        "request_ms",
        "import_ms",
        "copy_ms",
        "release_ms",
        "unpack_ms",
        "peft_ms",
        "from_tensors_ms",
        "activate_ms",
        "engine_rpc_ms",
        "reset_ms",
    ),
    "disk": ("save_ms", "load_ms", "activate_ms", "engine_rpc_ms", "reset_ms"),
    "floor": ("peft_ms", "from_tensors_ms", "activate_ms", "engine_rpc_ms", "reset_ms"),
}
TRANSPORT_STAGES = ("publish_ms", "request_ms", "import_ms", "copy_ms", "release_ms", "unpack_ms", "handoff_ms")
LABELS = {
    "publish_ms": "trainer pack + publish",
    "request_ms": "request round trip",
    "import_ms": "slab import / descriptor passing",
    "copy_ms": "copy into owned memory",
    "release_ms": "lease release",
    "unpack_ms": "unpack (tensor views)",
    "handoff_ms": "notify consumer + reply (bench pipe)",
    "peft_ms": "vLLM PEFTHelper",
    "from_tensors_ms": "vLLM from_lora_tensors",
    "activate_ms": "activation into LoRA slots",
    "engine_rpc_ms": "engine RPC to the worker",
    "reset_ms": "prefix-cache reset",
    "save_ms": "save_pretrained (/dev/shm)",
    "load_ms": "vLLM load from disk",
    "pack_ms": "pack into a warm buffer",
    "copy_out_ms": "one copy out (warm)",
}


def hardware() -> dict:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import vllm

        vllm_version: str | None = vllm.__version__
    except Exception:  # noqa: BLE001 - absent or broken: not part of this run
        vllm_version = None
    from ..core.memory.host_buffers import thp_mode

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "vllm": vllm_version,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "thp": thp_mode(),
        "load_avg_at_start": os.getloadavg()[0],
    }


def summary(xs: list[float]) -> dict:
    return {"p50_ms": statistics.median(xs), "p10_ms": percentile(xs, 10), "p90_ms": percentile(xs, 90), "n": len(xs)}


# ---- with a vLLM engine -------------------------------------------------------------------------


class BreakdownExtension:
    """``worker_extension_cls`` of the breakdown: each stage of a swap timed inside the worker."""

    model_runner: Any

    def _bd_manager(self):
        from ..vllm.compat import runtime

        return runtime.runner_lora_manager(self.model_runner)

    def _bd_load(self, tensors: dict, config: dict, lora_id: int, stages: dict) -> None:
        """lora_ipc's loader's vLLM calls (vllm/loader.py), each timed, then activation into a slot."""
        from vllm.lora.peft_helper import PEFTHelper

        from ..vllm.compat import runtime

        manager = self._bd_manager()
        t0 = time.perf_counter()
        config = dict(config, vllm_max_position_embeddings=getattr(manager, "max_position_embeddings", None))
        peft_helper = PEFTHelper.from_dict(config)
        peft_helper.validate_legal(manager.lora_config)
        t1 = time.perf_counter()
        model = runtime.adapter_manager(manager).model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        if mapper is not None and hasattr(mapper, "get_rename_mapper"):
            mapper = mapper.get_rename_mapper()
        lora_cls = runtime.lora_model_cls(manager)
        lora = lora_cls.from_lora_tensors(
            lora_model_id=lora_id,
            tensors=tensors,
            peft_helper=peft_helper,
            device=str(manager.device),
            dtype=manager.lora_config.lora_dtype,
            model_vocab_size=manager.vocab_size,
            weights_mapper=mapper,
            skip_prefixes=getattr(model, "lora_skip_prefixes", None),
        )
        t2 = time.perf_counter()
        self._bd_activate(lora, stages)
        stages |= {"peft_ms": (t1 - t0) * 1e3, "from_tensors_ms": (t2 - t1) * 1e3}

    def _bd_activate(self, lora, stages: dict) -> None:
        import torch

        from ..vllm.compat import runtime

        adapters = runtime.adapter_manager(self._bd_manager())
        t0 = time.perf_counter()
        adapters.add_adapter(lora)
        adapters.activate_adapter(lora.id)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stages["activate_ms"] = (time.perf_counter() - t0) * 1e3
        adapters.remove_adapter(lora.id)  # untimed: the next swap finds a free slot, as a hot swap does

    def bd_ipc(self, endpoint: str, name: str, version: int, lora_id: int) -> dict:
        from ..lora.adapters import AdapterClient

        started = time.perf_counter()
        client = self.__dict__.get("_bd_client")
        if client is None or client.endpoint != endpoint:
            client = self.__dict__["_bd_client"] = AdapterClient(endpoint)
        slabs, hits = len(client._slabs), HOST_BUFFERS.hits
        adapter = client.fetch(name, version, device=self._bd_manager().device)
        stages: dict[str, Any] = dict(client.last_stages, new_slab=len(client._slabs) > slabs)
        stages["recycled"] = HOST_BUFFERS.hits > hits  # the copy went into a warm pooled buffer
        self._bd_load(adapter.tensors, adapter.config, lora_id, stages)
        stages["worker_ms"] = (time.perf_counter() - started) * 1e3
        return stages

    def bd_disk(self, path: str, lora_id: int) -> dict:
        from vllm.lora.request import LoRARequest

        started = time.perf_counter()
        lora = self._bd_manager()._load_adapter(LoRARequest(f"bd-disk-{lora_id}", lora_id, path))
        stages: dict[str, Any] = {"load_ms": (time.perf_counter() - started) * 1e3}
        self._bd_activate(lora, stages)
        stages["worker_ms"] = (time.perf_counter() - started) * 1e3
        return stages

    def bd_hold(self, safetensors_bytes: bytes, config: dict) -> None:
        from safetensors.torch import load

        self.__dict__["_bd_held"] = (load(safetensors_bytes), config)

    def bd_floor(self, lora_id: int) -> dict:
        started = time.perf_counter()  # the worker's time, the clone included: not the engine's RPC
        held, config = self.__dict__["_bd_held"]
        tensors = {k: v.clone() for k, v in held.items()}  # in no stage: vLLM scales lora_b in place
        stages: dict[str, Any] = {}
        self._bd_load(tensors, config, lora_id, stages)
        stages["worker_ms"] = (time.perf_counter() - started) * 1e3
        return stages


def _engine_config(llm, hidden: int, layers: int, rank: int, iters: int, warmup: int, shm: str, model_dir: str):
    """One (rank, layers) configuration's samples: every stage of the three swaps, interleaved."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM
    from vllm.lora.request import LoRARequest

    from .. import AdapterExporter
    from ..lora.peft import adapter_from
    from ..tiny import lora_config
    from ..vllm import add_lora

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16), lora_config(rank))
    tensors, config = adapter_from(peft)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    llm.collective_rpc("bd_hold", args=(save({k: v.detach().contiguous() for k, v in tensors.items()}), config))
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in (*STAGES, "lora_ipc_e2e", "disk_e2e")}
    first_fetch: list[float] = []
    recycled: list[bool] = []

    def add(path: str, stages: dict) -> None:
        for k, v in stages.items():
            if isinstance(v, float):
                samples[path].setdefault(k, []).append(v)

    def reset() -> float:
        t = time.perf_counter()
        llm.reset_prefix_cache()
        return (time.perf_counter() - t) * 1e3

    with AdapterExporter(keep=2) as exporter:
        name = f"bd-r{rank}-l{layers}"
        for i in range(warmup + iters):
            timed = i >= warmup
            order = ["lora_ipc", "disk", "floor"]
            order = order[i % 3 :] + order[: i % 3]  # interleaved, rotated: no variant always follows another
            for path in order:
                lora_id = next(_lora_ids)
                t0 = time.perf_counter()
                if path == "lora_ipc":
                    version = exporter.publish(name, peft)
                    t1 = time.perf_counter()
                    stages = llm.collective_rpc("bd_ipc", args=(exporter.endpoint, name, version, lora_id))[0]
                    stages["publish_ms"] = (t1 - t0) * 1e3
                    rpc_ms = (time.perf_counter() - t1) * 1e3
                    recycled.append(stages.pop("recycled"))
                    if stages.pop("new_slab"):
                        first_fetch.append(stages["import_ms"])
                        stages["import_ms"] = 0.0  # steady state: a kept import; the first fetch is reported apart
                elif path == "disk":
                    out = os.path.join(shm, f"v{i}")
                    peft.save_pretrained(out)
                    t1 = time.perf_counter()
                    stages = llm.collective_rpc("bd_disk", args=(out, lora_id))[0]
                    stages["save_ms"] = (t1 - t0) * 1e3
                    rpc_ms = (time.perf_counter() - t1) * 1e3
                    shutil.rmtree(out)
                else:
                    t1 = time.perf_counter()
                    stages = llm.collective_rpc("bd_floor", args=(lora_id,))[0]
                    rpc_ms = (time.perf_counter() - t1) * 1e3
                stages["engine_rpc_ms"] = max(0.0, rpc_ms - stages.pop("worker_ms"))
                stages["reset_ms"] = reset()
                if timed:
                    add(path, stages)
            # the public paths end to end (vLLM's add_lora: load, add, activate at the next step)
            lora_id, disk_id = next(_lora_ids), next(_lora_ids)
            t0 = time.perf_counter()
            exporter.publish(name, peft)
            add_lora(llm, name, exporter.endpoint, lora_int_id=lora_id)
            t1 = time.perf_counter()
            out = os.path.join(shm, f"e2e{i}")
            peft.save_pretrained(out)
            llm.llm_engine.add_lora(LoRARequest(f"bd-e2e-{disk_id}", disk_id, out))
            t2 = time.perf_counter()
            shutil.rmtree(out)
            for done in (lora_id, disk_id):  # a hot swap retires the old version: its memory comes back
                llm.llm_engine.remove_lora(done)
            if timed:
                samples["lora_ipc_e2e"].setdefault("total_ms", []).append((t1 - t0) * 1e3)
                samples["disk_e2e"].setdefault("total_ms", []).append((t2 - t1) * 1e3)
    paths: dict[str, Any] = {}
    for path, stages in samples.items():
        per = {k: summary(v) for k, v in stages.items()}
        if path in STAGES:
            n = len(next(iter(stages.values())))
            totals = [sum(stages[k][j] for k in STAGES[path] if k in stages) for j in range(n)]
            per["total_ms"] = summary(totals)
        paths[path] = per
    return {
        "rank": rank,
        "layers": layers,
        "hidden": hidden,
        "tensors": len(tensors),
        "bytes": nbytes,
        "first_fetch_import_ms": first_fetch,
        "recycled_destinations": f"{sum(recycled)}/{len(recycled)}",
        "paths": paths,
    }


VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's LoRAConfig accepts as max_lora_rank (and 1)


def engine_rank(rank: int) -> int:
    """The engine's ``max_lora_rank`` for adapters up to ``rank``: the smallest value vLLM accepts."""
    return next((r for r in VLLM_RANKS if r >= rank), rank)


def run_engine(args) -> dict:
    from .cpu_engine import cpu_engine_env, scratch_dirs

    if args.device == "cpu":
        cpu_engine_env()  # before vLLM loads
    # the worker keeps one pinned version to reload (vllm/kept.py; default 4 x max_cpu_loras): with the default,
    # its first 16 fetches each stay kept and the next fetch lands in fresh memory until the kept cache is full
    os.environ.setdefault("LORA_IPC_WORKER_KEEP", "1")
    from vllm import LLM

    from ..tiny import tiny_engine_kwargs, write_model_dir

    # the engine's worker imports BreakdownExtension from this lora_ipc (a source checkout's too)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    results: dict[str, Any] = {"mode": "engine", "device": args.device, "iters": args.iters, "configs": []}
    results |= {"date": time.strftime("%Y-%m-%d"), "hardware": hardware()}
    with scratch_dirs("lora-bench-breakdown-") as (work, shm):
        for layers in args.layers:
            model_dir = write_model_dir(os.path.join(work, f"base{layers}"), args.hidden, layers)
            print(f"starting a vLLM engine ({args.device}, {layers} layers, hidden {args.hidden})...", flush=True)
            llm = LLM(
                **tiny_engine_kwargs(
                    model_dir,
                    engine_rank(max(args.ranks)),
                    enable_prefix_caching=True,
                    worker_extension_cls="lora_ipc.benchmarks.breakdown.BreakdownExtension",
                )
            )
            try:
                for rank in args.ranks:
                    config = _engine_config(llm, args.hidden, layers, rank, args.iters, args.warmup, shm, model_dir)
                    results["configs"].append(config)
                    save_json(args.json, results)  # a run cut short keeps what it measured
                    print(engine_table(config), flush=True)
            finally:
                llm.llm_engine.engine_core.shutdown()
                del llm
    return results


def engine_table(c: dict) -> str:
    lines = [f"r{c['rank']} x {c['layers']} layers: {c['tensors']} tensors, {c['bytes'] / 1e6:.2f} MB (p50 ms)"]
    for path, stages in STAGES.items():
        per = c["paths"][path]
        parts = "  ".join(f"{k[:-3]} {per[k]['p50_ms']:.2f}" for k in stages if k in per)
        lines.append(f"  {path:<9} total {per['total_ms']['p50_ms']:7.2f} = {parts}")
    for path in ("lora_ipc_e2e", "disk_e2e"):
        s = c["paths"][path]["total_ms"]
        spread = f"p10-p90 {s['p10_ms']:.2f}-{s['p90_ms']:.2f}"
        lines.append(f"  {path:<13} (public path, end to end) p50 {s['p50_ms']:.2f}  {spread}")
    if c["first_fetch_import_ms"]:
        first = statistics.median(c["first_fetch_import_ms"])
        lines.append(f"  first fetch: slab import incl. descriptor passing {first:.2f} ms")
    return "\n".join(lines)


# ---- transport only (no engine) -----------------------------------------------------------------


def _consumer(conn, device: str) -> None:
    from lora_ipc import AdapterClient

    client = None
    while True:
        msg = conn.recv()
        if msg is None:
            return
        endpoint, name, version = msg
        client = client or AdapterClient(endpoint)
        slabs, hits = len(client._slabs), HOST_BUFFERS.hits
        t0 = time.perf_counter()
        tensors = client.fetch(name, version, device=device).tensors
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        fetch_ms = (time.perf_counter() - t0) * 1e3
        stages = dict(client.last_stages, recycled=HOST_BUFFERS.hits > hits)
        conn.send((now(), fetch_ms, stages, len(client._slabs) > slabs, len(tensors)))
        del tensors


def run_transport(args) -> dict:
    import torch

    from .. import AdapterExporter
    from ..core.memory.layout import SlabLayout
    from .shapes import llama7b_lora, lora_config
    from .timing import sync

    device = args.device
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_consumer, args=(child, device), daemon=True)
    proc.start()
    child.close()  # the consumer's end is its own: if it dies, this end reads EOF at once
    results: dict[str, Any] = {"mode": "transport", "device": device, "iters": args.iters, "configs": []}
    results |= {"date": time.strftime("%Y-%m-%d"), "hardware": hardware()}
    exporter = AdapterExporter(keep=2)
    try:
        for layers in args.layers:
            for rank in args.ranks:
                tensors = llama7b_lora(rank, layers, torch.bfloat16, device)
                config = lora_config(rank)
                layout = SlabLayout.plan(tensors)
                warm_slab = torch.ones(layout.used_bytes, dtype=torch.uint8, device=device)
                warm_dst = torch.ones_like(warm_slab)
                views = layout.destination_views(warm_slab)
                samples: dict[str, dict[str, list[float]]] = {"lora_ipc": {}, "two_copy_floor": {}}
                first: list[float] = []
                recycled: list[bool] = []
                name = f"t-r{rank}-l{layers}"
                for i in range(args.warmup + args.iters):
                    for path in ("lora_ipc", "two_copy_floor") if i % 2 else ("two_copy_floor", "lora_ipc"):
                        sync(device)
                        if path == "two_copy_floor":
                            t0 = time.perf_counter()
                            layout.pack(views, tensors)
                            sync(device)
                            t1 = time.perf_counter()
                            warm_dst.copy_(warm_slab)
                            sync(device)
                            stages = {"pack_ms": (t1 - t0) * 1e3, "copy_out_ms": (time.perf_counter() - t1) * 1e3}
                        else:
                            t0 = now()
                            version = exporter.publish(name, tensors, config)
                            t1 = now()
                            parent.send((exporter.endpoint, name, version))
                            if not parent.poll(CONSUMER_TIMEOUT_S):
                                raise RuntimeError(f"the consumer process did not answer (exit code {proc.exitcode})")
                            t2, fetch_ms, stages, new_slab, count = parent.recv()
                            assert count == len(tensors)
                            stages["publish_ms"] = (t1 - t0) * 1e3
                            stages["handoff_ms"] = max(0.0, (t2 - t1) * 1e3 - fetch_ms)
                            stages["e2e_ms"] = (t2 - t0) * 1e3
                            recycled.append(stages.pop("recycled"))
                            if new_slab:
                                first.append(stages["import_ms"])
                                stages["import_ms"] = 0.0
                        if i >= args.warmup:
                            for k, v in stages.items():
                                samples[path].setdefault(k, []).append(v)
                paths = {p: {k: summary(v) for k, v in s.items()} for p, s in samples.items()}
                two = samples["two_copy_floor"]
                floor = [a + b for a, b in zip(two["pack_ms"], two["copy_out_ms"])]
                paths["two_copy_floor"]["total_ms"] = summary(floor)
                paths["lora_ipc"]["total_ms"] = paths["lora_ipc"].pop("e2e_ms")
                config_result = {
                    "rank": rank,
                    "layers": layers,
                    "tensors": len(tensors),
                    "bytes": layout.used_bytes,
                    "first_fetch_import_ms": first,
                    "recycled_destinations": f"{sum(recycled)}/{len(recycled)}",
                    "paths": paths,
                    "ratio_to_two_copies": paths["lora_ipc"]["total_ms"]["p50_ms"] / statistics.median(floor),
                    # what the transport adds to the two copies it makes, in ms (the ratio hides a slow pack)
                    "above_floor_ms": paths["lora_ipc"]["total_ms"]["p50_ms"] - statistics.median(floor),
                }
                results["configs"].append(config_result)
                save_json(args.json, results)
                print(transport_table(config_result), flush=True)
    finally:
        exporter.close()
        parent.send(None)
        proc.join(30)
    return results


def transport_table(c: dict) -> str:
    ipc, floor = c["paths"]["lora_ipc"], c["paths"]["two_copy_floor"]
    parts = "  ".join(f"{k[:-3]} {ipc[k]['p50_ms']:.2f}" for k in TRANSPORT_STAGES if k in ipc)
    return "\n".join(
        [
            f"r{c['rank']} x {c['layers']} layers: {c['tensors']} tensors, {c['bytes'] / 1e6:.1f} MB (p50 ms)",
            f"  lora_ipc publish -> consumer owns {ipc['total_ms']['p50_ms']:.2f} "
            f"(p10-p90 {ipc['total_ms']['p10_ms']:.2f}-{ipc['total_ms']['p90_ms']:.2f}) = {parts}",
            f"  two warm copies {floor['total_ms']['p50_ms']:.2f} = pack {floor['pack_ms']['p50_ms']:.2f} + "
            f"copy out {floor['copy_out_ms']['p50_ms']:.2f}",
            f"  ratio to the two-copy floor (this run): {c['ratio_to_two_copies']:.2f}x "
            f"({c['above_floor_ms']:.2f} ms above it); destinations recycled {c['recycled_destinations']}",
        ]
    )


# ---- the picture ---------------------------------------------------------------------------------


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine = results["mode"] == "engine"
    bars: list[tuple[str, dict, tuple[str, ...]]] = []
    ends: list[tuple[int, float]] = []  # (bar, the public path's end-to-end p50)
    for c in results["configs"]:
        tag = f"r{c['rank']}/{c['layers']}L\n{c['bytes'] / 1e6:.1f} MB"
        if engine:
            for p in STAGES:
                if p in ("lora_ipc", "disk"):
                    ends.append((len(bars), c["paths"][f"{p}_e2e"]["total_ms"]["p50_ms"]))
                bars.append((f"{tag}\n{p}", c["paths"][p], STAGES[p]))
        else:
            bars.append((f"{tag}\nlora_ipc", c["paths"]["lora_ipc"], TRANSPORT_STAGES))
            bars.append((f"{tag}\n2 copies", c["paths"]["two_copy_floor"], ("pack_ms", "copy_out_ms")))
    keys = list(dict.fromkeys(k for _, _, ks in bars for k in ks))
    colors = dict(zip(keys, plt.get_cmap("tab20")(range(20))))
    fig, ax = plt.subplots(figsize=(max(7.5, 0.75 * len(bars) + 2), 5.5), dpi=120)
    for x, (_, per, ks) in enumerate(bars):
        bottom = 0.0
        for k in ks:
            if k in per:
                h = per[k]["p50_ms"]
                ax.bar(x, h, bottom=bottom, color=colors[k], label=LABELS.get(k, k), width=0.7)
                bottom += h
    if ends:
        ax.plot(
            [x for x, _ in ends],
            [y for _, y in ends],
            "k_",
            markersize=22,
            markeredgewidth=2,
            label="public path end to end (add_lora), p50",
        )
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("ms (p50 of each stage, stacked)")
    hw = results["hardware"]
    where = hw["gpu"] or f"{hw['cpu']}, {hw['cores']} cores"
    ax.set_title(
        f"Adapter swap, stage by stage ({'vLLM engine' if engine else 'transport only'}, {results['device']})\n"
        f"{where}; torch {hw['torch']}, vLLM {hw['vllm']}; {results['date']}",
        fontsize=9,
    )
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    ax.legend(seen.values(), seen.keys(), fontsize=7, loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--engine", choices=("auto", "vllm", "none"), default="auto")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--layers", default=None, help="comma-separated layer counts (engine: 2,8; none: 8)")
    ap.add_argument("--hidden", type=int, default=1024, help="the engine's tiny Llama's hidden size")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--png")
    args = ap.parse_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    if args.engine == "auto":
        import importlib.util

        args.engine = "vllm" if importlib.util.find_spec("vllm") is not None else "none"
    args.layers = [int(n) for n in (args.layers or ("2,8" if args.engine == "vllm" else "8")).split(",")]
    results = run_engine(args) if args.engine == "vllm" else run_transport(args)
    save_json(args.json, results)
    if args.png:
        plot(results, args.png)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
