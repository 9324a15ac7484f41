"""AdapterPool: adapter ids served through a few slots, per request and per row.

A batch names adapters by id, per row: an id, ``None`` (the base model) or ``{id: strength, ...}``.
``with pool.route(rows):`` makes every named adapter resident (a slot hit, else a load into a free
or the least recently used unpinned slot, from the host cache or the source), routes the rows by
slot (strengths and blends through the routing weights: no new Python value reaches the graph),
and pins those slots until the block exits.

Threads. Entering ``route`` has two steps:

1. *Reserve* (under the pool's condition): every id of the batch gets its slot at once, all or
   nothing, and the slots are pinned. A pinned slot is never evicted. A batch whose misses find
   too few unpinned slots waits until other batches exit; a batch that names more distinct
   adapters than there are slots raises at once. Loads then run outside the condition, into slots
   no running forward reads (those are pinned), so they overlap other threads' forwards.
2. *Gate*: the routing table is one per model, so forwards that need different routings are
   serialised. The first batch in writes its routing; later batches with the same routing (same
   slots, same strengths) join it and run concurrently; a batch with another routing waits until
   every holder has exited. A waiting batch stops new joiners, so no routing starves.

Validate, then mutate: every id of a batch is resolved, read and validated (the slots' ``packed``,
which fills the host cache) before any slot changes hands, so a bad id raises for that batch only
and leaves the pool, the slots and the model as they were.

The pool owns the routing of its slots: do not call ``route``/``blend``/``activate`` on them
directly while the pool serves.

What a pool drives is declared once, :class:`PoolSlots`: :class:`~loraswap.AdapterSlots` (tensor-parallel
slots included), :class:`~loraswap.FusedSlots` and the pipelines' ``PipelineSlots`` / ``FusedPipelineSlots``
implement it. This module is core: it imports no Ray and no optional package.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from .adapter import AdapterSource
from .errors import AdapterNotFoundError, CapacityError, HotswapError, ModeError, SlotError

AdapterId = Hashable
Row = Union[AdapterId, None, Mapping[AdapterId, float]]
Resolve = Callable[[AdapterId], AdapterSource]
SlotWeights = tuple[tuple[int, float], ...]  # one row's routing: (slot, strength) pairs, sorted



class HostCounts(Protocol):
    """The host cache's counters a pool reports (:class:`~loraswap.cache.AdapterCache`)."""

    hits: int
    misses: int


class PoolSlots(Protocol):
    """What an :class:`AdapterPool` drives: slots it can fill (``packed`` then ``load_packed``), empty and route.

    ``slot_count``: how many slots; ``max_rows``: rows one routing holds (None: no fixed table, as a pipeline
    routes per prompt); ``max_blend``: adapters one row may blend (None: no limit checked here); ``fused``:
    whether the slots merge one adapter into the base weights for every row (one adapter per batch).
    """

    cache: HostCounts

    @property
    def slot_count(self) -> int: ...

    @property
    def max_rows(self) -> int | None: ...

    @property
    def max_blend(self) -> int | None: ...

    @property
    def fused(self) -> bool: ...

    def packed(self, source: Any, *, allow_pickle: bool = False) -> Any: ...

    def load_packed(self, packed: Any, slot: int = 0) -> None: ...

    def prefetch(self, source: Any, *, allow_pickle: bool = False) -> Future: ...

    def unload(self, slot: int = 0) -> None: ...

    def activate(self, slot: int) -> None: ...

    def route(self, ids: Sequence[int]) -> None: ...

    def blend(self, weights: Any) -> None: ...


_BASE = object()  # fused mode: the base model is staged in a slot like an adapter (an empty one)


@dataclass
class _Resident:
    """An adapter in a slot. ``ready`` is set once its load finished (``error`` set if it failed)."""

    adapter_id: AdapterId
    slot: int
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass
class _Batch:
    """One ``route`` call, parsed: its rows as ``{id: strength}`` and the distinct ids they name."""

    rows: list[dict[AdapterId, float]]
    ids: list[AdapterId]


class AdapterPool:
    """Adapter ids over the slots of an :class:`~loraswap.AdapterSlots`, ``PipelineSlots`` or
    :class:`~loraswap.FusedSlots`: LRU residency, pinning while in use, per-row strengths and blends.

    ``resolve(id)`` maps an id to what the slots load (a path, a hub id or an
    :class:`~loraswap.Adapter`); by default the id is the source itself. :class:`AdapterFolder`
    resolves the adapters of one folder by name.
    """

    def __init__(self, slots: PoolSlots, resolve: Resolve | None = None, *, allow_pickle: bool = False) -> None:
        self.slots = slots
        self.resolve = resolve if resolve is not None else _identity
        self.allow_pickle = allow_pickle
        self.slot_count = slots.slot_count
        self.fused = slots.fused
        self._max_rows = slots.max_rows
        self._max_blend = slots.max_blend
        self._cond = threading.Condition()
        self._by_id: OrderedDict[AdapterId, _Resident] = OrderedDict()  # least recently used first
        self._by_slot: dict[int, _Resident] = {}
        self._pins = [0] * self.slot_count
        self._routing: object = None  # the routing the slots hold now (None: unknown)
        self._holders = 0  # batches inside ``route`` under that routing
        self._waiting = 0  # batches waiting for their turn to route
        self._generation = 0  # routings written so far
        self._counts = dict.fromkeys(("slot_hits", "slot_loads", "evictions"), 0)
        cache = slots.cache
        self._host_base = (cache.hits, cache.misses)

    @property
    def stats(self) -> dict[str, int]:
        """Slot hits, slot loads, evictions (loads that replaced a resident adapter), host-cache hits and misses."""
        with self._cond:
            counts = dict(self._counts)
        cache = self.slots.cache
        counts["host_hits"] = cache.hits - self._host_base[0]
        counts["host_misses"] = cache.misses - self._host_base[1]
        return counts

    @property
    def resident(self) -> dict[AdapterId, int]:
        """Adapter id -> slot, least recently used first."""
        with self._cond:
            return {adapter_id: entry.slot for adapter_id, entry in self._by_id.items() if adapter_id is not _BASE}

    @contextmanager
    def route(self, rows: Sequence[Row]) -> Iterator[None]:
        """Make the adapters ``rows`` name resident, route row ``i`` to ``rows[i]``, pin them until exit.

        Row ``i`` is an adapter id, ``None`` (base model) or ``{id: strength, ...}`` (one adapter
        at a strength, or a blend). For pipeline slots a row is a prompt.
        """
        batch = self._parse(rows)
        entries, loads = self._acquire(batch)
        try:
            self._run_loads(loads)
            self._wait_ready(entries)
            routing = self._routing_of(batch, {entry.adapter_id: entry.slot for entry in entries})
            self._enter(routing)
        except BaseException:
            self._release(entries)
            raise
        try:
            yield
        finally:
            self._exit()
            self._release(entries)

    def prefetch(self, ids: Iterable[AdapterId]) -> list[Future]:
        """Read, validate and pad each id's adapter into the host cache on a background thread.

        Returns one future per id; each gives the packed adapter or raises that id's :class:`HotswapError`.
        """
        futures = []
        for adapter_id in ids:
            try:
                source = self._source(adapter_id)
            except HotswapError as err:
                failed: Future = Future()
                failed.set_exception(err)
                futures.append(failed)
                continue
            futures.append(self.slots.prefetch(source, allow_pickle=self.allow_pickle))
        return futures

    # -- parsing ---------------------------------------------------------------------------------

    def _parse(self, rows: Sequence[Row]) -> _Batch:
        if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sequence):
            raise SlotError(
                f"route takes one entry per row (a list), got {type(rows).__name__}; e.g. pool.route(['style-a', None])"
            )
        if self._max_rows is not None and len(rows) > self._max_rows:
            raise SlotError(
                f"route got {len(rows)} rows but the routing table holds {self._max_rows}; "
                f"attach with Capacity(max_batch={len(rows)}) or more"
            )
        parsed = [_parse_row(row, position) for position, row in enumerate(rows)]
        if self._max_blend is not None:
            for position, row in enumerate(parsed):
                if sum(strength != 0.0 for strength in row.values()) > self._max_blend:
                    raise SlotError(
                        f"row {position} blends {len(row)} adapters but Capacity.max_blend is {self._max_blend}; "
                        f"attach with Capacity(max_blend={len(row)}) or more"
                    )
        ids = list(dict.fromkeys(adapter_id for row in parsed for adapter_id in row))
        if self.fused:
            ids = self._check_fused(parsed, ids)
        if len(ids) > self.slot_count:
            raise CapacityError(
                f"the batch names {len(ids)} distinct adapters but the pool has {self.slot_count} slots; "
                f"split the batch, or attach with Capacity(slots={len(ids)}) or more"
            )
        return _Batch(parsed, ids)

    def _check_fused(self, rows: list[dict[AdapterId, float]], ids: list[AdapterId]) -> list[AdapterId]:
        """Fused mode merges one adapter for every row: a batch names one adapter at strength 1, or none."""
        if len(ids) > 1 or any(row != rows[0] for row in rows):
            raise ModeError(
                f"fused slots serve one adapter per batch, but this batch's rows name {ids or 'the base model'} "
                "differently; send one adapter (or None) for every row, or attach with mode='slots'"
            )
        if ids and rows[0][ids[0]] != 1.0:
            raise ModeError(
                f"fused slots merge adapters at strength 1, but {ids[0]!r} has strength {rows[0][ids[0]]}; "
                "attach with mode='slots' to scale adapters per request"
            )
        return ids or [_BASE]

    # -- residency -------------------------------------------------------------------------------

    def _acquire(self, batch: _Batch) -> tuple[list[_Resident], list[tuple[_Resident, object]]]:
        """Pin a slot for every id of the batch, all at once; returns the entries and the loads this batch must run.

        Misses are packed (read and validated) before any slot changes hands.
        """
        packed: dict[AdapterId, object] = {}
        while True:
            with self._cond:
                while True:
                    misses = [adapter_id for adapter_id in batch.ids if adapter_id not in self._by_id]
                    unpacked = [adapter_id for adapter_id in misses if adapter_id not in packed]
                    if unpacked:
                        break
                    plan = self._plan(batch.ids, misses)
                    if plan is not None:
                        return self._commit(batch.ids, dict(zip(misses, plan)), packed)
                    self._cond.wait()
            for adapter_id in unpacked:  # outside the condition: reads from disk overlap other batches
                packed[adapter_id] = self._pack(adapter_id)

    def _plan(self, ids: list[AdapterId], misses: list[AdapterId]) -> list[int] | None:
        """A slot for each miss: free slots first, then unpinned residents, least recently used first."""
        if not misses:
            return []
        hits = {self._by_id[adapter_id].slot for adapter_id in ids if adapter_id in self._by_id}
        free = [slot for slot in range(self.slot_count) if slot not in self._by_slot and self._pins[slot] == 0]
        unpinned = [e.slot for e in self._by_id.values() if self._pins[e.slot] == 0 and e.slot not in hits]
        candidates = free + unpinned
        return candidates[: len(misses)] if len(candidates) >= len(misses) else None

    def _commit(
        self, ids: list[AdapterId], slot_for: dict[AdapterId, int], packed: dict[AdapterId, object]
    ) -> tuple[list[_Resident], list[tuple[_Resident, object]]]:
        """Under the condition: evict and claim the planned slots, pin every slot of the batch."""
        loads = []
        for adapter_id, slot in slot_for.items():
            evicted = self._by_slot.pop(slot, None)
            if evicted is not None:
                del self._by_id[evicted.adapter_id]
                self._counts["evictions"] += 1
            entry = _Resident(adapter_id, slot)
            self._by_id[adapter_id] = self._by_slot[slot] = entry
            loads.append((entry, packed[adapter_id]))
        entries = []
        for adapter_id in ids:
            entry = self._by_id[adapter_id]
            self._by_id.move_to_end(adapter_id)
            self._pins[entry.slot] += 1
            entries.append(entry)
        self._counts["slot_hits"] += len(ids) - len(loads)
        self._counts["slot_loads"] += len(loads)
        return entries, loads

    def _run_loads(self, loads: list[tuple[_Resident, object]]) -> None:
        """Write the adapters this batch claimed slots for; after a failure the rest fail with it."""
        error: BaseException | None = None
        for entry, packed in loads:
            if error is None:
                try:
                    self._write(entry, packed)
                except BaseException as err:  # noqa: BLE001 - re-raised below, after every waiter is told
                    error = err
            if error is not None:
                self._forget(entry, error)
            entry.ready.set()
        if error is not None:
            raise error

    def _write(self, entry: _Resident, packed: object) -> None:
        if entry.adapter_id is _BASE:
            self.slots.unload(entry.slot)
        else:
            self.slots.load_packed(packed, entry.slot)

    def _forget(self, entry: _Resident, error: BaseException) -> None:
        """A load that failed: the slot holds no known adapter, and batches waiting for it raise ``error``."""
        entry.error = error
        with self._cond:
            if self._by_slot.get(entry.slot) is entry:
                del self._by_slot[entry.slot]
                del self._by_id[entry.adapter_id]
            self._cond.notify_all()

    @staticmethod
    def _wait_ready(entries: list[_Resident]) -> None:
        for entry in entries:
            entry.ready.wait()
            if entry.error is not None:
                raise entry.error

    def _release(self, entries: list[_Resident]) -> None:
        with self._cond:
            for entry in entries:
                self._pins[entry.slot] -= 1
            self._cond.notify_all()

    def _pack(self, adapter_id: AdapterId) -> object:
        """Read and validate ``adapter_id`` for these slots (through the host cache); nothing is written."""
        if adapter_id is _BASE:
            return None
        return self.slots.packed(self._source(adapter_id), allow_pickle=self.allow_pickle)

    def _source(self, adapter_id: AdapterId) -> AdapterSource:
        try:
            return self.resolve(adapter_id)
        except HotswapError:
            raise
        except (KeyError, LookupError, OSError, ValueError) as err:
            raise AdapterNotFoundError(
                f"adapter id {adapter_id!r} does not resolve ({type(err).__name__}: {err}); "
                "check the id, or the resolve function given to AdapterPool"
            ) from err

    # -- routing ---------------------------------------------------------------------------------

    def _routing_of(self, batch: _Batch, slot_of: Mapping[AdapterId, int]) -> tuple:
        """The slots' routing for the batch, as a hashable key: ("activate", slot), ("route", ids) or ("blend", rows)."""
        if self.fused:
            return ("activate", slot_of[batch.ids[0]])
        rows: list[SlotWeights] = [
            tuple(sorted((slot_of[adapter_id], strength) for adapter_id, strength in row.items())) for row in batch.rows
        ]
        if all(len(row) == 0 or (len(row) == 1 and row[0][1] == 1.0) for row in rows):
            return ("route", tuple(row[0][0] if row else -1 for row in rows))
        return ("blend", tuple(rows))

    def _enter(self, routing: tuple) -> None:
        """Wait until the slots may hold ``routing``, write it if they do not, and hold it.

        A batch joins the holders of its routing at once unless another batch waits; then it waits
        for the next routing written, so that the waiting batch gets its turn.
        """
        with self._cond:
            if self._holders and (self._routing != routing or self._waiting):
                arrived_at = self._generation
                self._waiting += 1
                try:
                    self._cond.wait_for(
                        lambda: not self._holders or (self._routing == routing and self._generation != arrived_at)
                    )
                finally:
                    self._waiting -= 1
            if self._routing != routing:
                self._routing = None  # a failed write leaves the table unknown to the pool
                self._write_routing(routing)
                self._routing = routing
                self._generation += 1
                self._cond.notify_all()
            self._holders += 1

    def _write_routing(self, routing: tuple) -> None:
        verb, value = routing
        if verb == "activate":
            self.slots.activate(value)
        elif verb == "route":
            self.slots.route(list(value))
        else:
            self.slots.blend([dict(row) for row in value])

    def _exit(self) -> None:
        with self._cond:
            self._holders -= 1
            self._cond.notify_all()

    def __repr__(self) -> str:
        return f"AdapterPool(slots={self.slot_count}, fused={self.fused}, resident={self.resident}, stats={self.stats})"


def _parse_row(row: Row, position: int) -> dict[AdapterId, float]:
    if row is None:
        return {}
    if isinstance(row, Mapping):
        strengths = {}
        for adapter_id, strength in row.items():
            if adapter_id is None:
                raise SlotError(f"row {position}: None is not an adapter id; leave the base model out of a blend")
            try:
                value = float(strength)
            except (TypeError, ValueError) as err:
                raise SlotError(f"row {position}: strength {strength!r} of {adapter_id!r} is not a number") from err
            if not math.isfinite(value):
                raise SlotError(f"row {position}: strength {value} of {adapter_id!r} is not finite; give a finite float")
            strengths[adapter_id] = value
        return strengths
    if isinstance(row, Hashable):
        return {row: 1.0}
    raise SlotError(
        f"row {position} is a {type(row).__name__}; give an adapter id, None (base model) or {{id: strength}}"
    )


def _identity(adapter_id: AdapterId) -> AdapterSource:
    if isinstance(adapter_id, (str, os.PathLike)):
        return adapter_id
    raise AdapterNotFoundError(
        f"adapter id {adapter_id!r} is not a path or hub id; give AdapterPool a resolve function for such ids"
    )


def pool_batches(indices: Sequence[int], adapters: Sequence[Hashable | None], max_rows: int, slots: int) -> list[list[int]]:
    """Consecutive runs of ``indices`` with at most ``max_rows`` rows and at most ``slots`` distinct adapters
    (``adapters[i]`` is row ``i``'s; None, the base model, takes no slot): what one pool route can hold."""
    batches: list[list[int]] = []
    distinct: set[Hashable] = set()
    for index in indices:
        grown = distinct | ({adapters[index]} - {None})
        if not batches or len(batches[-1]) == max_rows or len(grown) > slots:
            batches.append([])
            grown = {adapters[index]} - {None}
        batches[-1].append(index)
        distinct = grown
    return batches
