"""Every benchmark of the project, in the package, so ``lora-ipc bench`` works from a plain wheel install.

- :mod:`.transport`: adapter hand-off, publish -> consumer owns the tensors, three ways (``lora-ipc bench``
  runs it over several sizes through :mod:`.sweep`, which writes JSON and a PNG plot)
- :mod:`.buckets`: full-weight refit buckets, GB/s against the device's own copy floor
- :mod:`.vmm`: CUDA export paths, torch CUDA IPC against native VMM slabs (needs a GPU)
- :mod:`.vllm_lora`: request -> adapter active in a running vLLM engine (needs vLLM)
- :mod:`.vllm_refit`: a full refit into a running vLLM engine against vLLM's disk reload (needs vLLM)
- :mod:`.ray_nodes`: across two Ray nodes on loopback, lora_ipc's relays beside save + load through a shared
  directory, a bare Ray transfer and a bare TCP stream (needs Ray, safetensors, root for ``unshare -n``)

Shared parts: :mod:`.shapes` (Llama-7B LoRA and layer shapes), :mod:`.timing` (clocks, percentiles,
the OpenMP setting), :mod:`.cpu_engine` (a vLLM CPU engine's environment, a trainer's step, greedy tokens).

``benches/bench_*.py`` in a source checkout are script entry points to these (they set
``OMP_WAIT_POLICY`` before torch loads); ``benches/device_check*.sh`` run them on the GPU machine.
"""
