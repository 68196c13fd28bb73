"""Memory: sealed shared-memory files and their generation tables, slab layouts, recycled host buffers and
the optional native extension (CUDA VMM primitives)."""
