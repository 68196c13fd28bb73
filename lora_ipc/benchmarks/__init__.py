"""Benchmarks shipped in the package, so ``lora-ipc bench`` works from a plain wheel install.

- :mod:`.transport`: publish -> consumer owns the tensors, three ways (``python -m lora_ipc.benchmarks.transport``)
- :mod:`.shapes`: Llama-7B LoRA shapes

``benches/`` in a source checkout holds thin script entry points to these, plus benchmarks that need
the test helpers (``benches/bench_vllm.py``).
"""
