"""The host adapter cache: adapters read, validated and padded once, kept under an LRU byte budget.

An entry is a :class:`~loraswap.layout.PackedAdapter`, already in the slot layout (pinned when
the model is on CUDA), so a warm swap is one copy per flat buffer. Keys notice a changed file:
a path is keyed by its resolved location, size and modification time (hub snapshots resolve to
content-addressed blobs); an in-memory :class:`~loraswap.adapter.Adapter` by identity.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

from .adapter import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME, Adapter, AdapterSource, resolve_source
from .layout import PackedAdapter


def default_cache_bytes() -> int:
    """A quarter of physical memory, at most 16 GiB."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return min(physical // 4, 16 << 30)


def _file_stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def cache_key(source: AdapterSource, revision: str | None = None) -> Hashable:
    """A key that changes whenever the adapter's bytes on disk may have changed."""
    if isinstance(source, Adapter):
        return ("adapter", id(source))
    path = resolve_source(source, revision)
    if path.is_dir():
        files = [path / name for name in (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME) if (path / name).exists()]
        return tuple(_file_stamp(f) for f in files)
    return _file_stamp(path)


class AdapterCache:
    """A thread-safe LRU of packed adapters under a byte budget (0 disables caching)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[PackedAdapter, object]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> PackedAdapter | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, packed: PackedAdapter, keep_alive: object = None) -> None:
        """Insert ``packed``, evicting least recently used entries; ``keep_alive`` pins the object an id-key names."""
        size = packed.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[0].nbytes
            while self._entries and self._bytes + size > self.max_bytes:
                _, (evicted, _) = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
            self._entries[key] = (packed, keep_alive)
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
