"""Where a host fetch lands: fresh memory, huge-page-advised fresh memory, or a recycled buffer, beside memcpy.

The benchmark is :mod:`lora_ipc.benchmarks.destinations` (arguments and method there, ``--help``)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: lora_ipc.benchmarks.timing.OMP_ENV
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lora_ipc.benchmarks.destinations import main

    main()
