"""The host adapter cache: adapters read, validated and padded once, kept under an LRU byte budget.

An entry is a :class:`~loraswap.layout.PackedAdapter`, already in the slot layout (pinned when
the model is on CUDA), so a warm swap is one copy per flat buffer (fused mode keeps its own
entry type; anything with ``nbytes`` fits).

Keys notice a changed file without reading it: a path is keyed by ``os.stat`` of each file the
adapter is read from (device, inode, size, modification and change times, symlinks followed).
Rewriting, replacing or touching a file gives a new key; two spellings of one path give the
same key. Hub snapshots are symlinks to content-addressed blobs, so their key follows the
content. As with ``make`` or git, a rewrite that keeps the size and lands within the file
system's timestamp granularity of the previous write is not noticed. An in-memory
:class:`~loraswap.adapter.Adapter` is keyed by identity.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Protocol, TypeVar

from .adapter import Adapter, AdapterSource
from .formats.locate import CONFIG_NAME, SAFETENSORS_NAME, locate
from .errors import CapacityError

FileStamp = tuple[int, int, int, int, int]


def default_cache_bytes() -> int:
    """A quarter of physical memory, at most 16 GiB."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return min(physical // 4, 16 << 30)


def _stamp(status: os.stat_result) -> FileStamp:
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def file_stamp(path: str | os.PathLike) -> FileStamp | None:
    """One file's ``stat`` stamp (symlinks followed), None when it does not exist."""
    try:
        return _stamp(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def cache_key(source: AdapterSource, revision: str | None = None) -> Hashable:
    """A key that changes whenever the adapter's bytes on disk may have changed: two or three ``stat`` calls.

    The files stamped are the ones :func:`~loraswap.formats.locate.locate` picks, which are the ones a load
    reads. A warm swap computes the key every time, so the common case, a PEFT folder with safetensors weights,
    is tried first: the stamps of ``adapter_config.json`` and ``adapter_model.safetensors``.
    """
    if isinstance(source, Adapter):
        return ("adapter", id(source))
    path = os.path.expanduser(os.fspath(source))
    weights = file_stamp(os.path.join(path, SAFETENSORS_NAME))
    if weights is not None:
        return ("dir", file_stamp(os.path.join(path, CONFIG_NAME)), weights)
    located = locate(source, revision)  # a hub id resolved, or AdapterNotFoundError / AdapterFormatError
    if located.directory:
        config = None if located.config is None else file_stamp(str(located.config))
        return ("dir", config, str(located.weights), _stamp(os.stat(located.weights)))
    return ("file", _stamp(os.stat(located.weights)))


class CacheEntry(Protocol):
    """What the cache holds: anything that knows its host bytes (a packed or fused adapter)."""

    @property
    def nbytes(self) -> int: ...


Entry = TypeVar("Entry", bound=CacheEntry)


class AdapterCache:
    """A thread-safe LRU of packed adapters under a byte budget (0 disables caching).

    An adapter larger than the whole budget is not cached. ``hits`` and ``misses`` count
    lookups. :meth:`get_or_build` builds each missing key once even when several threads (a
    prefetch and a load) ask for it at the same time.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise CapacityError(f"cache_bytes is {max_bytes}; give a byte budget >= 0 (0 disables the host cache)")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[CacheEntry, object]] = OrderedDict()
        self._building: dict[Hashable, Future] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> CacheEntry | None:
        """The entry under ``key``, now the most recently used, or None."""
        with self._lock:
            return self._lookup(key)

    def _lookup(self, key: Hashable) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry[0]

    def get_or_build(self, key: Hashable, build: Callable[[], Entry], keep_alive: object = None) -> Entry:
        """The entry under ``key``; on a miss ``build()`` it (outside the lock) and cache it.

        A thread that misses while another builds the same key waits for that build instead of
        repeating it; if that build raised, it builds with its own ``build`` (whose arguments,
        such as ``allow_pickle``, may differ) and raises its own error.
        """
        with self._lock:
            entry = self._lookup(key)
            if entry is not None:
                return entry
            pending = self._building.get(key)
            if pending is None:
                pending = self._building[key] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            try:
                return pending.result()
            except Exception:  # noqa: BLE001 - the owner's error belongs to its arguments; build with ours
                return self._build(key, build, keep_alive, None)
        return self._build(key, build, keep_alive, pending)

    def _build(self, key: Hashable, build: Callable[[], Entry], keep_alive: object, pending: Future | None) -> Entry:
        try:
            entry = build()
        except BaseException as err:
            if pending is not None:
                self._finish(key, pending)
                pending.set_exception(err)
            raise
        self.put(key, entry, keep_alive)
        if pending is not None:
            self._finish(key, pending)
            pending.set_result(entry)
        return entry

    def _finish(self, key: Hashable, pending: Future) -> None:
        with self._lock:
            if self._building.get(key) is pending:
                del self._building[key]

    def put(self, key: Hashable, entry: CacheEntry, keep_alive: object = None) -> None:
        """Insert ``entry``, evicting least recently used entries; ``keep_alive`` pins the object an id-key names."""
        size = entry.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[0].nbytes
            while self._entries and self._bytes + size > self.max_bytes:
                _, (evicted, _) = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
            self._entries[key] = (entry, keep_alive)
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
