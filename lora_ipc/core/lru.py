"""One bounded least-recently-used map for every cache lora_ipc keeps (peers choose the keys, so every
cache needs a bound and something to do with what falls out)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedLRU(Generic[K, V]):
    """At most ``capacity`` entries; ``on_evict(key, value)`` runs for each entry pushed out. Not
    thread-safe on its own: callers hold their own lock."""

    def __init__(self, capacity: int, on_evict: Callable[[K, V], None] | None = None):
        self.capacity = capacity
        self.on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value (marked as just used), or None."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> V:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            old_key, old_value = self._items.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old_key, old_value)
        return value

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def clear(self) -> None:
        """Drop everything, running ``on_evict`` for each entry."""
        while self._items:
            key, value = self._items.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(key, value)

    def keys(self) -> list[K]:
        return list(self._items)

    def values(self) -> list[V]:
        return list(self._items.values())

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._items))
