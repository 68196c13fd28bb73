"""Layouts planned once per distinct (names, dtypes, shapes): a training loop republishes one layout every
step, and a slab packed with the same layout again reuses its destination views (``ExportedSlab.pack``)."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from ..lru import BoundedLRU
from .layout import SlabLayout, signature_of


class LayoutCache:
    def __init__(self, capacity: int = 16):
        self._layouts: BoundedLRU[tuple, SlabLayout] = BoundedLRU(capacity)
        self._lock = threading.Lock()

    def layout_for(self, tensors: Mapping[str, torch.Tensor]) -> SlabLayout:
        """The layout for ``tensors``' signature, planned (and validated) the first time it is seen."""
        key = signature_of(tensors)
        with self._lock:
            layout = self._layouts.get(key)
        if layout is None:
            layout = SlabLayout.plan(tensors)
            with self._lock:
                self._layouts.put(key, layout)
        return layout
