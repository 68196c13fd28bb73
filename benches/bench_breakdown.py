"""Where every millisecond of an adapter swap goes: each stage, beside the disk path and the floor.

The benchmark is :mod:`lora_ipc.benchmarks.breakdown` (arguments and method there, ``--help``)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: lora_ipc.benchmarks.timing.OMP_ENV
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lora_ipc.benchmarks.breakdown import main

    main()
