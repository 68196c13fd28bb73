"""Across two Ray nodes (loopback, private network namespace): lora_ipc's relays beside save + load through a
shared directory and a bare Ray object transfer of the same bytes.

The benchmark is :mod:`lora_ipc.benchmarks.ray_nodes` (arguments and method there, ``--help``)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: lora_ipc.benchmarks.timing.OMP_ENV
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lora_ipc.benchmarks.ray_nodes import main

    main()
