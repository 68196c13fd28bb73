"""Request -> adapter active in a running vLLM engine (CPU build): lora-ipc:// vs save_pretrained on
/dev/shm, beside the floor.

    python benches/bench_vllm.py [--iters 20] [--hidden 512 --layers 4 --rank 16]

Each iteration is a new adapter version, timed three ways, interleaved, same engine:

  lora_ipc  the trainer publishes it, ``add_lora(llm, ...)`` returns once the worker fetched, loaded
            and activated it (publish + version lookup + fetch + vLLM's load and activation)
  floor     the same adapter already held by the worker as tensors (put there before the clock starts,
            one fresh copy per load, because vLLM scales lora_B in place): the same request and loader
            path with the transport replaced by a dict lookup; what no transport can beat
  disk_shm  ``save_pretrained`` into /dev/shm, then ``llm.llm_engine.add_lora`` with that directory

Prints p50/p90, lora-ipc's overhead over the floor (lora_ipc - floor) beside the disk path's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

from .cpu_engine import cpu_engine_env, perturb, scratch_dirs
from .timing import percentile, save_json

FLOOR_ENDPOINT = "ipc://lora-ipc-bench-floor"  # never bound: the worker serves it from memory


class HeldClient:
    """Stands in for an :class:`~lora_ipc.AdapterClient` in the loader: ``fetch`` hands out the versions
    put in ``held`` beforehand (each once), whatever else the loader asks for."""

    def __init__(self, held: dict):
        self.held = held

    def fetch(self, name, version=None, device=None, epoch=None, *, max_bytes=None):
        return self.held.pop(version)


class FloorExtension:
    """``worker_extension_cls`` for the floor: tensors handed to the worker before timing, served to
    lora_ipc's own loader in place of a fetch (a bench-only substitute for ``with_shared_client``)."""

    def floor_hold(self, version: int, safetensors_bytes: bytes, peft_config: dict) -> int:
        from safetensors.torch import load

        from ..lora.adapters import Adapter
        from ..vllm import loader

        held = self.__dict__.setdefault("_floor_held", {})
        held[version] = Adapter("floor", version, load(safetensors_bytes), peft_config)
        if not getattr(loader, "_floor_installed", False):
            real, client = loader.with_shared_client, HeldClient(held)
            loader.with_shared_client = lambda endpoint, call: (
                call(client) if endpoint == FLOOR_ENDPOINT else real(endpoint, call)
            )
            loader._floor_installed = True  # type: ignore[attr-defined]  # marks the module patched
        return len(held)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cpu_engine_env()  # before vLLM loads

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from .. import AdapterExporter
    from ..lora.peft import adapter_from
    from ..tiny import TARGET_MODULES, tiny_engine_kwargs, write_model_dir
    from ..vllm import AdapterURI, add_lora

    # the engine's worker imports FloorExtension from this lora_ipc (a source checkout's too)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)

    with scratch_dirs("lora-bench-vllm-") as (work, shm):
        model_dir = write_model_dir(os.path.join(work, "base"), args.hidden, args.layers)
        print("starting the vLLM engine (CPU, ~30-60 s)...", flush=True)
        llm = LLM(
            **tiny_engine_kwargs(
                model_dir,
                max(16, args.rank),
                enable_prefix_caching=True,
                worker_extension_cls="lora_ipc.benchmarks.vllm_lora.FloorExtension",
            )
        )
        peft = get_peft_model(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16),
            LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGET_MODULES, init_lora_weights=False),
        )
        times: dict[str, list[float]] = {"lora_ipc": [], "floor": [], "disk_shm": []}
        with AdapterExporter(keep=2) as exporter:
            for i in range(args.warmup + args.iters):
                perturb(peft, 10_000 + i, 0.05, only="lora_")  # a trainer's step
                tensors, config = adapter_from(peft)  # what publish() sends
                state = {k: v.detach().contiguous() for k, v in tensors.items()}
                llm.collective_rpc("floor_hold", args=(i + 1, save(state), config))
                t0 = time.perf_counter()
                exporter.publish("policy", peft)
                add_lora(llm, "policy", exporter.endpoint)
                t1 = time.perf_counter()
                llm.llm_engine.add_lora(
                    LoRARequest(f"floor-v{i}", 700_000 + i, str(AdapterURI("floor", i + 1, FLOOR_ENDPOINT, "f1002")))
                )
                t2 = time.perf_counter()
                out = os.path.join(shm, f"v{i}")
                peft.save_pretrained(out)
                llm.llm_engine.add_lora(LoRARequest(f"disk-v{i}", 500_000 + i, out))
                t3 = time.perf_counter()
                shutil.rmtree(out)
                if i >= args.warmup:
                    times["lora_ipc"].append((t1 - t0) * 1e3)
                    times["floor"].append((t2 - t1) * 1e3)
                    times["disk_shm"].append((t3 - t2) * 1e3)
        llm.llm_engine.engine_core.shutdown()
        nbytes = sum(p.numel() * p.element_size() for n, p in peft.named_parameters() if "lora_" in n)
        res = {
            "hidden": args.hidden,
            "layers": args.layers,
            "rank": args.rank,
            "adapter_bytes": nbytes,
            **{k: {"p50_ms": statistics.median(v), "p90_ms": percentile(v, 90)} for k, v in times.items()},
        }
        res["ratio_disk_over_ipc"] = res["disk_shm"]["p50_ms"] / res["lora_ipc"]["p50_ms"]
        floor = res["floor"]["p50_ms"]
        res["overhead_over_floor_ms"] = {k: res[k]["p50_ms"] - floor for k in ("lora_ipc", "disk_shm")}
        print(
            f"vLLM CPU engine, hidden={args.hidden} layers={args.layers} r={args.rank} "
            f"adapter={nbytes / 1e6:.2f} MB, {args.iters} iterations"
        )
        for k in times:
            over = "" if k == "floor" else f"   over the floor p50 +{res['overhead_over_floor_ms'][k]:.2f} ms"
            print(f"  {k:<9} request -> active  p50 {res[k]['p50_ms']:8.2f} ms   p90 {res[k]['p90_ms']:8.2f} ms{over}")
        print(
            f"  lora-ipc is {res['ratio_disk_over_ipc']:.1f}x faster than save_pretrained + load from /dev/shm; "
            f"its transport adds {res['overhead_over_floor_ms']['lora_ipc']:.2f} ms to vLLM's own load "
            f"({floor:.2f} ms)"
        )
        save_json(args.json, res)
        return res


if __name__ == "__main__":
    main()
