"""The exporting side: the versioned store of tensor sets, its slab pool, the server answering
fetches, the in-process and remote exporters, the ``lora-ipc serve`` daemon and its metrics."""
