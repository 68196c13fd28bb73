"""Request to adapter active in a running vLLM engine, lora-ipc:// against /dev/shm and the floor.

The benchmark is :mod:`lora_ipc.benchmarks.vllm_lora` (arguments and method there, ``--help``)."""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lora_ipc.benchmarks.vllm_lora import main

    main()
