"""Full-weight refit bucket throughput (GB/s) against the device's copy floor.

The benchmark is :mod:`lora_ipc.benchmarks.buckets` (arguments and method there, ``--help``)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: lora_ipc.benchmarks.timing.OMP_ENV
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lora_ipc.benchmarks.buckets import main

    main()
