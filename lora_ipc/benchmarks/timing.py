"""Clocks, summaries and the results file every benchmark here shares."""

from __future__ import annotations

import json
import os
import time

# OpenMP threads that spin after a parallel copy steal the other process's cores on small CPU
# machines and make every cross-process hand-off look milliseconds slower, whatever the path. It
# must be in the environment before torch loads: the ``benches/`` scripts set it first thing,
# ``lora-ipc bench`` starts the transport benchmark in a fresh interpreter with it; consumers inherit it.
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def quiet_openmp() -> None:
    """Set :data:`OMP_ENV` (where unset) in this process's environment; effective only before torch loads."""
    for key, value in OMP_ENV.items():
        os.environ.setdefault(key, value)


def now() -> float:
    """CLOCK_MONOTONIC seconds: one clock every process on the machine shares."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def sync(device: str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def percentile(xs, q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``xs``."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def save_json(path: str | None, results: dict, indent: int = 2) -> None:
    """Write ``results`` to ``path`` (``--json``); nothing without one."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=indent)
