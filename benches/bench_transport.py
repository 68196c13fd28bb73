"""Script entry point for :mod:`lora_ipc.benchmarks.transport` (the benchmark lives in the package, so
``lora-ipc bench`` works from a wheel). Same arguments:

    python benches/bench_transport.py                      # CUDA if available, 7B shapes, r16 and r64
    python benches/bench_transport.py --device cpu --layers 8
"""

import os
import sys

if __name__ == "__main__":
    # before torch loads (see lora_ipc.benchmarks.transport.OMP_ENV)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lora_ipc.benchmarks.transport import main

    main()
