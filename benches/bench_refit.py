"""Full refit of a ~100M-parameter Llama into a running vLLM engine, lora_ipc against /dev/shm.

The benchmark is :mod:`lora_ipc.benchmarks.vllm_refit` (arguments and method there, ``--help``)."""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lora_ipc.benchmarks.vllm_refit import main

    main()
