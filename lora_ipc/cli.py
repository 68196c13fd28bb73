"""``lora-ipc`` / ``python -m lora_ipc``: serve | status | demo | bench."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from .core.channels.endpoint import daemon_endpoint
from .core.errors import EndpointInUse, EndpointNotTrusted

if TYPE_CHECKING:
    from .core.protocol import StatusReport


def _cmd_serve(args) -> int:
    import logging

    from .core.serving.daemon import serve

    # the daemon's one output channel: logging, to stdout, one line per event
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="lora-ipc: %(message)s", force=True)

    try:
        return serve(
            args.endpoint,
            keep=args.keep,
            lease_timeout_s=args.lease_timeout,
            drain_s=args.drain,
            metrics_port=args.metrics_port,
            check_finite=args.check_finite,
        )
    except (EndpointInUse, EndpointNotTrusted) as exc:
        print(f"lora-ipc serve: {exc}", file=sys.stderr)
        return 2


def _human_bytes(n: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"


def format_status(report: StatusReport) -> str:
    m, slabs = report.metrics, report.slabs
    lines = [
        f"lora-ipc server pid {report.pid} on {report.endpoint}, up {report.uptime_s:.0f} s, keep={report.keep}",
        f"slabs: {slabs.live} ({_human_bytes(slabs.bytes)}), free {slabs.free}",
        "",
        f"{'name':<24} {'version':>7} {'size':>10} {'tensors':>7} {'leases':>6}  published",
    ]
    for v in report.versions:
        when = time.strftime("%H:%M:%S", time.localtime(v.published_at))
        lines.append(
            f"{v.name:<24} {v.version:>7} {_human_bytes(v.bytes):>10} {v.tensors:>7} "
            f"{v.leases:>6}  {when}{'  (retiring)' if v.retiring else ''}"
        )
    if not report.versions:
        lines.append("(nothing published)")
    lines += ["", f"live leases: {report.lease_count}"]
    for lease in report.leases:
        lines.append(
            f"  #{lease.lease_id} {lease.name}@v{lease.version} held by {lease.holder}, "
            f"expires in {lease.expires_in_s:.1f} s"
        )
    h = m.fetch_latency
    mean = f"{h.sum_ms / h.count:.3f} ms mean" if h.count else "none yet"
    lines += [
        "",
        f"publishes {m.publishes}, fetches {m.fetches}, bytes moved {_human_bytes(m.bytes_served)}, "
        f"errors {m.errors}, leases expired {m.leases_expired}, fetch latency {mean}",
    ]
    return "\n".join(lines)


def _cmd_status(args) -> int:
    import msgspec

    from .core.errors import ExporterUnavailable
    from .core.fetching.client import TensorSetClient

    try:
        with TensorSetClient(args.endpoint, timeout_s=args.timeout) as client:
            report = client.status()
    except (ExporterUnavailable, EndpointNotTrusted) as exc:
        print(f"lora-ipc status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(msgspec.to_builtins(report), indent=2) if args.json else format_status(report))
    return 0


def _require(command: str, modules: tuple[str, ...], extra: str) -> None:
    """A subcommand's optional dependencies, or one line saying which extra installs them."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"lora-ipc {command} needs {', '.join(missing)}: pip install 'lora-ipc[{extra}]'")


def _cmd_demo(args) -> int:
    _require("demo", ("peft", "transformers", "vllm"), "peft,vllm")
    from .demo import run_demo

    return run_demo(steps=args.steps, device=args.device, rank=args.rank)


def _cmd_bench(args) -> int:
    _require("bench", ("safetensors", "matplotlib"), "bench")
    if args.breakdown or args.scaling:
        from .benchmarks.sweep import run_breakdown

        return run_breakdown(args)
    from .benchmarks.sweep import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lora-ipc", description="Move LoRA adapters into a running vLLM engine through shared GPU/CPU memory."
    )
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the adapter server as a daemon that owns its adapters")
    s.add_argument("--endpoint", default=daemon_endpoint(), help="ipc:// endpoint (default: %(default)s)")
    s.add_argument("--keep", type=int, default=2, help="versions kept fetchable per adapter (default: 2)")
    s.add_argument("--lease-timeout", type=float, default=30.0, help="seconds before an unreleased lease is reclaimed")
    s.add_argument("--drain", type=float, default=5.0, help="seconds to wait for held leases on shutdown")
    s.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT")
    s.add_argument("--check-finite", action="store_true", help="reject adapters holding NaN/Inf at publish time")
    s.set_defaults(fn=_cmd_serve)

    s = sub.add_parser("status", help="what a server holds: names, versions, leases, metrics")
    s.add_argument("--endpoint", default=daemon_endpoint(), help="ipc:// endpoint (default: %(default)s)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--timeout", type=float, default=3.0)
    s.set_defaults(fn=_cmd_status)

    s = sub.add_parser("demo", help="train a tiny Llama's LoRA in one process, generate with vLLM in another")
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--device", default=None, help="trainer device (default: cuda if available, else cpu)")
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("bench", help="run the transport benchmark; write JSON, a PNG plot and a table")
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    s.add_argument(
        "--ranks", default=None, help="comma-separated LoRA ranks (default: 4,8,16,32,64 on GPU, 4,16,64 on CPU)"
    )
    s.add_argument(
        "--layers",
        default=None,
        help="Llama layers (default: 32 on GPU, 8 on CPU); --breakdown: comma-separated layer counts (default 2,8)",
    )
    s.add_argument("--iters", type=int, default=20)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png")
    s.add_argument(
        "--breakdown",
        action="store_true",
        help="time each stage of one swap into a vLLM engine beside the disk path and the floor "
        "(breakdown.json, breakdown.png; see lora_ipc/benchmarks/breakdown.py)",
    )
    s.add_argument(
        "--engine",
        choices=("auto", "vllm", "none"),
        default="auto",
        help="--breakdown: a real vLLM engine (auto: where vLLM is installed) or the transport stages only",
    )
    s.add_argument(
        "--scaling",
        action="store_true",
        help="latency against adapter bytes, tensor count and concurrent consumers, beside memcpy "
        "(scaling.json, scaling.png; --ranks sets the bytes sweep)",
    )
    s.add_argument("--hidden", type=int, default=1024, help="--breakdown: the engine's tiny Llama's hidden size")
    s.set_defaults(fn=_cmd_bench)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
