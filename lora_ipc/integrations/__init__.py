"""Shipped integrations with RL frameworks (each imports its framework only when imported itself).

- :mod:`.openrlhf` — OpenRLHF 0.11: ``install(adapter=..., max_lora_rank=..., max_loras=...)`` before
  ``create_vllm_engines``.
- :mod:`.verl` — verl 0.9: ``ColocateExtension`` (lora_ipc's worker extension composed with verl's).
- :mod:`.trl` — TRL 1.16: ``install(adapter=...)`` before building a GRPOTrainer (server or colocate) or
  AsyncGRPOTrainer: adapter-only sync through lora_ipc (docs/guides/trl.md).
- :mod:`.sharded` — gather a sharded (FSDP2 / DTensor) PeftModel's LoRA state on rank 0 and publish it.
"""
