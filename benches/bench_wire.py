"""Decode time per message type (``protocol.decode``), plus encode. Runs against any lora_ipc on PYTHONPATH,
so the same script measures before and after a protocol change:

    PYTHONPATH=. python benches/bench_wire.py
"""

from __future__ import annotations

import argparse
import time

import msgspec
import torch

from lora_ipc.core import protocol as p
from lora_ipc.core.memory.layout import SlabLayout


def _layout(n: int) -> SlabLayout:
    return SlabLayout.plan(
        {f"base_model.model.layers.{i}.self_attn.q_proj.lora_A.weight": torch.zeros(16, 64) for i in range(n)}
    )


def _summary(*fields):
    return (getattr(p, "TensorSetSummary", None) or p.AdapterSummary)(*fields)  # named AdapterSummary before


def _status_report() -> dict:
    """A real store's report, with what a server adds (a plain dict: any protocol version encodes it)."""
    from lora_ipc.core.serving import store as stores

    store = getattr(stores, "TensorSetStore", None) or stores.AdapterStore  # AdapterStore: its name before
    store = store()
    try:
        for i in range(16):
            store.publish(f"adapter-{i}", {"w": torch.ones(4, 4)}, {"r": 4})
            store.lease(f"adapter-{i}", None, b"\x00k", client=f"client-{i}")
        report = store.status()
        return (report if isinstance(report, dict) else msgspec.to_builtins(report)) | {
            "endpoint": "ipc:///tmp/x.sock",
            "pid": 42,
            "server": dict(connections=1, connection_cap=64, peak_connections=2, dropped_connections=0, requests=9),
        }
    finally:
        store.close()


def cases() -> list[tuple[str, object]]:
    slot = p.GenerationSlot(3, "gen.77.ab")
    cpu = p.CpuSlabHandle("1.ab.1", 1 << 30, generation=slot, token=b"t" * 16)
    config = {
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "use_dora": False,
    }
    small, large = _layout(8), _layout(1 << 15)
    digest = b"c" * 16

    def first_reply(layout):  # a client's first fetch: the config, the slab handle and the whole layout
        return p.FetchReply(
            "policy",
            3,
            9,
            digest,
            config,
            "1.ab.1",
            cpu,
            4,
            layout.digest,
            layout.to_wire(),
            layout.used_bytes,
            ["1.ab.1"],
            "e90c4a1f",
        )

    return [
        ("list", p.ListRequest()),
        ("list_reply (64 adapters)", p.ListReply([_summary(f"a{i}", [1, 2], 4096) for i in range(64)], "e90c4a1f")),
        ("fetch", p.FetchRequest("policy", None, "client-1", ["1.ab.1"], [digest], [digest])),
        (
            "fetch_reply (steady state)",
            p.FetchReply(
                "policy", 3, 9, digest, None, "1.ab.1", None, 4, digest, None, small.used_bytes, ["1.ab.1"], "e90c4a1f"
            ),
        ),
        ("fetch_reply (8 tensors, all sent)", first_reply(small)),
        ("fetch_reply (32k tensors)", first_reply(large)),
        ("release", p.ReleaseRequest(5, 0.25)),
        ("release_reply", p.ReleaseReply(5)),
        ("publish (8 tensors)", p.PublishRequest("policy", config, cpu, small.to_wire(), small.used_bytes)),
        ("publish_reply", p.PublishReply("policy", 4)),
        ("status", p.StatusRequest()),
        ("status_reply (16 adapters, 16 leases)", p.StatusReply(_status_report())),
        ("error", p.ErrorReply("LayoutError", "bad layout")),
    ]


def per_call_us(fn, budget_s: float) -> float:
    n, best = 1, float("inf")
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - started
        best = min(best, elapsed / n)
        if elapsed < 0.02:
            n *= 2
    return best * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=0.5, help="time spent per case (best of repeats)")
    args = parser.parse_args(argv)
    print(f"{'message':38s} {'bytes':>9s} {'decode us':>11s} {'encode us':>11s}")
    for name, message in cases():
        frame = p.encode(message, 7)
        assert type(p.decode(frame).message) is type(message)
        decode_us = per_call_us(lambda frame=frame: p.decode(frame), args.budget_s)
        encode_us = per_call_us(lambda message=message: p.encode(message, 7), args.budget_s)
        print(f"{name:38s} {len(frame):9d} {decode_us:11.2f} {encode_us:11.2f}")


if __name__ == "__main__":
    main()
