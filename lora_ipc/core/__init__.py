"""The transport core: everything that moves a named, versioned set of tensors from one process to another.

Layers, lowest first (a module imports only from its own layer or lower ones; tests/test_layers.py checks):

- basics: :mod:`.errors`, :mod:`.settings`, :mod:`.lru`
- :mod:`.protocol`: every message on the wire, the bounded decoder, field checks
- :mod:`.memory`: shared-memory files, slab layouts, host buffers, the native extension
- :mod:`.channels`: endpoints, peer identity, connections, the descriptor channel
- :mod:`.backends`: slabs (CPU memfd, torch CUDA IPC, CUDA VMM) exported and imported
- :mod:`.serving` (store, server, exporter, daemon) and :mod:`.fetching` (client, imports)

Nothing here knows LoRA, vLLM or Ray.
"""
