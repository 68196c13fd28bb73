"""The importing side: the client that fetches a version and owns its tensors, and the registry of
imported slabs."""
