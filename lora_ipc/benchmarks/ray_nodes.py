"""Across two Ray nodes: lora_ipc's relays beside the disk path users have there, and a bare Ray transfer.

    python benches/bench_ray_nodes.py --ranks 4,8,16,32,64 --layers 32 --iters 7 \\
        --json docs/development/bench-ray-nodes-cpu.json

A two-node ``ray.cluster_utils.Cluster`` (two raylets, each with its own object store and a resource of its
own, ``node_a`` / ``node_b``) in a private network namespace that has only loopback (``unshare -n``; the
benchmark re-executes itself there unless ``--no-netns``), so Ray never binds the machine's address. A
producer actor on node A holds a Llama-7B-shaped LoRA (``shapes.llama7b_lora``: 7 projections per layer, bf16)
and a consumer actor on node B takes it, per iteration, three ways, interleaved:

  lora_ipc   ``lora_ipc.ray.publish`` on A (pack into A's relay, A's relay ships it to B's relay, returns when
             B's relay serves it), then ``AdapterClient.fetch`` from B's relay on B (the tensors owned by B):
             what an engine on node B loads from.
  disk       ``safetensors.torch.save_file`` (what ``save_pretrained`` writes) + ``adapter_config.json`` into a
             shared directory on A, then ``safetensors.torch.load_file`` on B (the tensors owned by B).
  ray_floor  the same bytes as one uint8 array: ``ray.put`` on A, ``ray.get`` on B (mapped from B's object
             store, not copied out): Ray's own cost of moving them between nodes.
  tcp_floor  the same bytes over one TCP connection from A to B (node addresses), received into a fresh
             buffer on B: what a direct stream between the relays would cost at best.

Each path's time is its producer's call plus its consumer's call, each timed inside its actor (the driver's
two Ray calls in between are left out, for every path alike; ``e2e`` includes them). For lora_ipc the
stages come from the relays (:meth:`lora_ipc.ray.relay_actor.Relay.last_replication`). The consumer checks
each path's bytes against the producer's once per size (a digest, outside the timed calls).

On one machine both "nodes" share one page cache and one directory, so the disk path never touches a disk
or a network filesystem: it is the cheapest disk path a cluster can have.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Any

from .timing import OMP_ENV, now, save_json

PATHS = ("lora_ipc", "disk", "ray_floor", "tcp_floor")
NODE_A, NODE_B = "node_a", "node_b"


def loopback_only() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def reexec_in_private_netns(argv: list[str]) -> None:
    """Run this benchmark again in a fresh network namespace that has only loopback (Ray binds 127.0.0.1)."""
    import shlex

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, **OMP_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "lora_ipc.benchmarks.ray_nodes", *argv]
    shell = "ip link set lo up && exec " + " ".join(shlex.quote(a) for a in cmd)
    os.execvpe("unshare", ["unshare", "-n", "sh", "-c", shell], env)


def digest(tensors: dict) -> str:
    """A digest of a tensor set's names, dtypes, shapes and bytes (in name order)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def touch(tensors: dict) -> None:
    """Read one byte of every 4 KiB page of every tensor: ``load_file`` maps the file (copy-on-write) and reads
    nothing, so the bytes reach the process's memory only when first read; this is that first read, without
    copying (what an engine's copy into its LoRA slots would pay on top of a copy from resident memory)."""
    import torch

    for t in tensors.values():
        flat = t.view(-1).view(torch.uint8)
        flat[::4096].max()
        flat[-1:].max()


def bytes_digest(array) -> str:
    return hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest()


class Producer:
    """Node A: the trainer side. Holds one adapter at a time."""

    def prepare(self, rank: int, layers: int) -> dict:
        import numpy as np
        import torch

        from .shapes import llama7b_lora, lora_config

        self.tensors = llama7b_lora(rank, layers)
        self.config = lora_config(rank)
        nbytes = sum(t.numel() * t.element_size() for t in self.tensors.values())
        flat = torch.empty(nbytes, dtype=torch.uint8)
        offset = 0
        for t in self.tensors.values():
            n = t.numel() * t.element_size()
            flat[offset : offset + n] = t.contiguous().view(-1).view(torch.uint8)
            offset += n
        self.flat = flat.numpy()
        assert isinstance(self.flat, np.ndarray)
        return {"bytes": nbytes, "tensors": len(self.tensors), "digest": digest(self.tensors)}

    def flat_digest(self) -> str:
        return bytes_digest(self.flat)

    def publish(self, name: str) -> dict:
        import lora_ipc.ray

        t0 = now()
        version = lora_ipc.ray.publish(name, self.tensors, self.config)
        return {"version": version, "t0": t0, "t1": now()}

    def save(self, directory: str) -> dict:
        from safetensors.torch import save_file

        t0 = now()
        os.makedirs(directory, exist_ok=True)
        save_file(self.tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(self.config, f)
        return {"t0": t0, "t1": now()}

    def put(self) -> dict:
        import ray

        t0 = now()
        ref = ray.put(self.flat)
        return {"refs": [ref], "t0": t0, "t1": now()}  # in a list: handed on, not resolved by the driver

    def send(self, address: tuple[str, int]) -> dict:
        t0 = now()
        with socket.create_connection(address) as conn:
            conn.sendall(self.flat.data)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # the consumer closes once it has every byte
        return {"t0": t0, "t1": now()}

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class Consumer:
    """Node B: the engine side. Keeps what it took until the next take (as an engine holds its adapter)."""

    def __init__(self) -> None:
        self.client: Any = None
        self.held: Any = None
        self.listener: socket.socket | None = None

    def fetch(self, endpoint: str, name: str, version: int, check: bool = False) -> dict:
        from ..lora.adapters import AdapterClient

        if self.client is None:
            self.client = AdapterClient(endpoint, timeout_s=120)
        self.held = None
        t0 = now()
        adapter = self.client.fetch(name, version)
        t1 = now()
        self.held = adapter.tensors
        return {"t0": t0, "t1": t1, "digest": digest(adapter.tensors) if check else None}

    def load_disk(self, directory: str, check: bool = False) -> dict:
        from safetensors.torch import load_file

        self.held = None
        t0 = now()
        tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
        with open(os.path.join(directory, "adapter_config.json")) as f:
            json.load(f)
        t1 = now()
        touch(tensors)
        t2 = now()
        self.held = tensors
        return {"t0": t0, "t1": t1, "t2": t2, "digest": digest(tensors) if check else None}

    def get(self, refs: list, check: bool = False) -> dict:
        import ray

        self.held = None
        t0 = now()
        array = ray.get(refs[0])
        t1 = now()
        self.held = array
        return {"t0": t0, "t1": t1, "digest": bytes_digest(array) if check else None}

    def listen(self) -> tuple[str, int]:
        import ray

        self.listener = socket.create_server((ray.util.get_node_ip_address(), 0))
        return self.listener.getsockname()[:2]

    def receive(self, nbytes: int, check: bool = False) -> dict:
        """One connection's ``nbytes`` into a fresh buffer of this process (the listener was made by ``listen``)."""
        import numpy as np

        assert self.listener is not None
        self.held = None
        conn, _ = self.listener.accept()
        t0 = now()
        with conn:
            buf = np.empty(nbytes, dtype=np.uint8)
            view, got = memoryview(buf.data), 0
            while got < nbytes:
                n = conn.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError(f"the sender stopped after {got} of {nbytes} bytes")
                got += n
            t1 = now()
        self.listener.close()
        self.held = buf
        return {"t0": t0, "t1": t1, "digest": bytes_digest(buf) if check else None}

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def start_cluster(object_store_bytes: int):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(
            num_cpus=2, resources={NODE_A: 1}, object_store_memory=object_store_bytes, include_dashboard=False
        ),
    )
    node_b = cluster.add_node(num_cpus=2, resources={NODE_B: 1}, object_store_memory=object_store_bytes)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    head: Any = cluster.head_node
    return cluster, head.node_id, node_b.node_id


def ms(stage: dict) -> float:
    return (stage["t1"] - stage["t0"]) * 1e3


def take_lora_ipc(producer, consumer, relay_a, endpoint_b: str, name: str, check: bool) -> tuple[dict, str | None]:
    import ray

    p = ray.get(producer.publish.remote(name), timeout=600)
    report = ray.get(relay_a.last_replication.remote(name), timeout=60)
    c = ray.get(consumer.fetch.remote(endpoint_b, name, p["version"], check), timeout=600)
    stages = {"publish_ms": ms(p)}
    if report and report["version"] == p["version"]:
        stages |= {
            "local_publish_ms": ms(p) - report["elapsed_ms"],  # into A's relay, and Ray's calls around replicate
            "replica_put_ms": report["stages_ms"]["replica_put_ms"],  # A's relay: its slab into A's object store
            # Ray moves the object to B's store, B's relay copies it into its slab, and the accept call's trips
            "transfer_accept_ms": report["stages_ms"]["ship_accept_ms"],
        }
    stages["fetch_ms"] = ms(c)
    return stages | {"total_ms": ms(p) + ms(c), "e2e_ms": (c["t1"] - p["t0"]) * 1e3}, c["digest"]


def take_disk(producer, consumer, directory: str, check: bool) -> tuple[dict, str | None]:
    import ray

    p = ray.get(producer.save.remote(directory), timeout=600)
    c = ray.get(consumer.load_disk.remote(directory, check), timeout=600)
    shutil.rmtree(directory, ignore_errors=True)
    fault_in = (c["t2"] - c["t1"]) * 1e3
    stages = {"save_ms": ms(p), "load_ms": ms(c), "fault_in_ms": fault_in}
    total = ms(p) + ms(c) + fault_in
    return stages | {"total_ms": total, "lazy_total_ms": ms(p) + ms(c), "e2e_ms": (c["t2"] - p["t0"]) * 1e3}, c[
        "digest"
    ]


def take_ray_floor(producer, consumer, check: bool) -> tuple[dict, str | None]:
    import ray

    p = ray.get(producer.put.remote(), timeout=600)
    c = ray.get(consumer.get.remote(p.pop("refs"), check), timeout=600)
    stages = {"put_ms": ms(p), "get_ms": ms(c)}
    return stages | {"total_ms": ms(p) + ms(c), "e2e_ms": (c["t1"] - p["t0"]) * 1e3}, c["digest"]


def take_tcp_floor(producer, consumer, nbytes: int, check: bool) -> tuple[dict, str | None]:
    import ray

    address = ray.get(consumer.listen.remote(), timeout=60)
    received = consumer.receive.remote(nbytes, check)
    p, c = ray.get([producer.send.remote(address), received], timeout=600)
    total = (c["t1"] - p["t0"]) * 1e3  # connect, send, receive into the consumer's buffer
    return {"total_ms": total, "e2e_ms": total}, c["digest"]


def run(ranks: list[int], layers: int, iters: int, warmup: int, shared_dir: str | None) -> dict:
    import ray

    from ..ray import relay_actor
    from ..ray.relay_fleet import start_relays, stop_relays
    from .breakdown import hardware, summary
    from .shapes import PROJECTIONS

    biggest = 2 * max(ranks) * layers * sum(i + o for i, o in PROJECTIONS.values())  # bf16 A and B
    object_store = max(256 << 20, 4 * biggest)
    started = time.perf_counter()
    cluster, a, b = start_cluster(object_store)
    shared = tempfile.mkdtemp(prefix="lora-ipc-bench-ray-", dir=shared_dir)
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "hardware": hardware() | {"ray": ray.__version__},
        "cluster": {"nodes": 2, "object_store_bytes": object_store, "network": "loopback only (private netns)"},
        "layers": layers,
        "iters": iters,
        "warmup": warmup,
        "sizes": [],
    }
    try:
        relays = start_relays(keep=2)
        producer: Any = ray.remote(Producer).options(num_cpus=0, resources={NODE_A: 0.01}).remote()
        consumer: Any = ray.remote(Consumer).options(num_cpus=0, resources={NODE_B: 0.01}).remote()
        if ray.get([producer.node_id.remote(), consumer.node_id.remote()], timeout=120) != [a, b]:
            raise RuntimeError("the producer and consumer actors are not on nodes A and B")
        relay_a = relay_actor.relay_handle(a)
        for rank in ranks:
            name = f"r{rank}"
            info: dict = ray.get(producer.prepare.remote(rank, layers), timeout=600)
            expected = {"lora_ipc": info["digest"], "disk": info["digest"]}
            expected["ray_floor"] = expected["tcp_floor"] = ray.get(producer.flat_digest.remote(), timeout=600)
            samples: dict[str, dict[str, list[float]]] = {path: {} for path in PATHS}
            same: dict[str, bool] = {}
            load_avg = [os.getloadavg()[0]]
            for i in range(warmup + iters):
                check = i == warmup + iters - 1  # the bytes are checked once, on the last (timed) iteration
                for path in PATHS if i % 2 == 0 else PATHS[::-1]:
                    if path == "lora_ipc":
                        stages, got = take_lora_ipc(producer, consumer, relay_a, relays[b], name, check)
                    elif path == "disk":
                        stages, got = take_disk(producer, consumer, os.path.join(shared, f"{name}-{i}"), check)
                    elif path == "ray_floor":
                        stages, got = take_ray_floor(producer, consumer, check)
                    else:
                        stages, got = take_tcp_floor(producer, consumer, info["bytes"], check)
                    if i >= warmup:
                        for stage, value in stages.items():
                            samples[path].setdefault(stage, []).append(value)
                    if check:
                        same[path] = got == expected[path]
            load_avg.append(os.getloadavg()[0])
            per = {path: {stage: summary(xs) for stage, xs in samples[path].items()} for path in PATHS}
            disk = per["disk"]["total_ms"]["p50_ms"]
            results["sizes"].append(
                {
                    "rank": rank,
                    "layers": layers,
                    "mb": round(info["bytes"] / 1e6, 3),
                    "tensors": info["tensors"],
                    "paths": per,
                    "disk_over_lora_ipc": disk / per["lora_ipc"]["total_ms"]["p50_ms"],
                    "disk_over_ray_floor": disk / per["ray_floor"]["total_ms"]["p50_ms"],
                    "disk_over_tcp_floor": disk / per["tcp_floor"]["total_ms"]["p50_ms"],
                    "bytes_equal": same,
                    "load_avg_1m": load_avg,
                }
            )
            print(row(results["sizes"][-1]), flush=True)
    finally:
        try:
            stop_relays()
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(shared, ignore_errors=True)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    return results


def cell(summary: dict) -> str:
    return f"{summary['p50_ms']:.1f} ({summary['p10_ms']:.1f}-{summary['p90_ms']:.1f})"


def row(size: dict) -> str:
    p = size["paths"]
    return (
        f"r{size['rank']:<3} {size['mb']:7.1f} MB  lora_ipc {cell(p['lora_ipc']['total_ms'])}  "
        f"disk {cell(p['disk']['total_ms'])}  ray_floor {cell(p['ray_floor']['total_ms'])}  "
        f"tcp_floor {cell(p['tcp_floor']['total_ms'])}  "
        f"disk/lora_ipc {size['disk_over_lora_ipc']:.2f}x  bytes equal {size['bytes_equal']}"
    )


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="4,8,16,32,64")
    ap.add_argument("--layers", type=int, default=32, help="Llama-7B layers (32: the whole model's LoRA)")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--shared-dir", help="where the disk path writes (default: the temp directory)")
    ap.add_argument("--json")
    ap.add_argument("--no-netns", action="store_true", help="stay in this network namespace (Ray binds its address)")
    args = ap.parse_args(argv)
    if not args.no_netns and not loopback_only():
        reexec_in_private_netns(argv)  # does not return
    ranks = [int(r) for r in args.ranks.split(",")]
    results = run(ranks, args.layers, args.iters, args.warmup, args.shared_dir)
    print(f"p50 (p10-p90) ms of {args.iters} interleaved iterations, producer on node A + consumer on node B")
    for size in results["sizes"]:
        print(row(size))
    save_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
