"""Where a swap happens: :class:`AdapterSlots`, the handle ``attach`` returns.

A load resolves the adapter to a :class:`~loraswap.layout.PackedAdapter` (from the host cache,
or read, validated and padded on a miss), then copies it into the slot's row of each flat
buffer: one ``torch._foreach_copy_`` over a few large spans, the rank rows the adapter fills,
and the slot's scales and live mask (rows past the live ones are masked out in the forward,
never zeroed: see :mod:`loraswap.layout`). Everything that can fail happens
before that copy, so a failed load leaves every tensor of the model bit-for-bit as it was. No
verb changes a shape, dtype, device, storage or Python attribute that the compiled graph reads.

On CUDA the cached adapter sits in pinned host memory and the copy is issued without blocking
on a side stream; the stream that called ``load`` waits on it (an event), so every forward
queued after ``load`` returns sees the whole adapter, and forwards queued before it overlap
the copy when the slot is one no row reads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from .adapter import Adapter, AdapterSource, load_adapter
from .cache import AdapterCache, cache_key
from .capacity import Capacity
from .dora import resolve_dora
from .errors import DoraStrengthError, LayoutChangedError, SlotError
from .formats.safetensors import ReadBuffer
from .layers import SlotConv1D, SlotEmbedding, SlotLayer
from .layout import LiveRows, PackedAdapter, SlotLayout, SlotStorage, check_packed_for
from .value_checks import check_saved_base_weights
from .routing import BlendWeights, Router

MAX_KEPT_DESTINATIONS = 4096

# writes one slot row, given its (weights, scales, live masks), one tensor per group in each
SlotWrite = Callable[[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]], object]


class AdapterSlots:
    """Loads adapters into slots, activates, routes and blends them, and keeps the host cache.

    Threads. A row's routing weight for slot ``s`` is exactly 0 unless ``activate``/``route``/
    ``blend`` gave it one, and a slot enters a forward only multiplied by its row's weight. So:

    - loading into a slot that no row reads is safe while another thread runs forwards, without
      any lock: the values a forward may read there mid-copy are old or new, all finite
      (validated), and times exactly 0 they add exactly nothing, so the output is bit-for-bit
      what it would be with any other finite values in that slot;
    - ``activate``, ``route``, ``blend``, ``unload`` and a load into a slot that rows read change
      what a forward computes, and every layer reads the routing table on its own. They take
      ``lock``; a serving thread must hold ``lock`` around each forward (``with slots.lock:
      model(x)``) so that no forward sees the change halfway through its layers. (Without the
      lock, a change could only be made atomic per forward by the forward reading the routing
      once, or by a barrier between forwards, which is what the lock is.)

    On CUDA the lock orders the queuing of work, and stream order does the rest as long as the
    forwards and the verbs run on the same stream (each thread's default stream is the same one).

    The pattern for a swap that never stalls serving: ``load(new, slot=idle)`` (or ``prefetch``
    earlier) while forwards run, then ``activate(idle)`` between two forwards.
    """

    def __init__(
        self,
        model: nn.Module,
        capacity: Capacity,
        layout: SlotLayout,
        storage: SlotStorage,
        router: Router,
        cache: AdapterCache,
        *,
        check_rows: bool = False,
    ) -> None:
        self.model = model
        self.capacity = capacity
        self.layout = layout
        self.storage = storage
        self.router = router
        self.cache = cache
        self.lock = threading.RLock()
        self._write_lock = threading.Lock()  # slot writes vs the routing verbs; taken after ``lock``
        self._read_buffers = threading.local()  # per thread: the file buffer that loads without a host cache reuse
        self._loaded: dict[int, str] = {}
        self._read_slots: frozenset[int] = frozenset({0})  # slots some row reads with a non-zero weight
        self._partial_slots: frozenset[int] = frozenset()  # slots some row reads at a weight other than 0 and 1
        self._dora_slots: set[int] = set()  # slots holding a DoRA adapter (served at weight 0 or 1 only)
        self._prefetcher: ThreadPoolExecutor | None = None
        self._routed: tuple[int, str] | None = None  # (count, "row"/"token") the last route/blend list gave
        if check_rows:  # runs eagerly, outside the graph (disabled here, not at class definition: that imports dynamo)
            model.register_forward_pre_hook(torch.compiler.disable(self._check_forward_rows), with_kwargs=True)
        # a move or cast after attach replaces the buffers in this dict (read directly: every load checks it)
        self._sentinel_buffers = self._first_layer()._buffers
        self._sentinel_ptr = self._sentinel_buffers["lora_A"].data_ptr()
        self._rows = [  # per slot: (weights, scales, live masks), one row per group in each
            tuple(tuple(tensor[slot] for tensor in part) for part in (storage.weights, storage.scales, storage.live))
            for slot in range(capacity.slots)
        ]
        self._destinations: dict[tuple[int, LiveRows], tuple[torch.Tensor, ...]] = {}
        device = router.per_token.device
        self._pin = device.type == "cuda"
        self._copy_stream = None
        if device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(device)
            self._copy_stream.wait_stream(torch.cuda.current_stream(device))  # after attach's zero-fill

    def _first_layer(self) -> SlotLayer:
        return next(m for m in self.model.modules() if isinstance(m, SlotLayer))

    # What an AdapterPool reads (loraswap.pool.PoolSlots)
    @property
    def slot_count(self) -> int:
        return self.capacity.slots

    @property
    def max_rows(self) -> int | None:
        return self.router.max_batch

    @property
    def max_blend(self) -> int | None:
        return self.capacity.max_blend

    fused = False

    @property
    def loaded(self) -> dict[int, str]:
        """Slot -> source of the adapter loaded there."""
        return dict(self._loaded)

    def packed(self, source: AdapterSource, *, allow_pickle: bool = False) -> PackedAdapter:
        """The adapter in slot layout: from the cache, else read, validated, padded and cached."""

        def build() -> PackedAdapter:
            return self.read_packed(source, allow_pickle)

        keep_alive = source if isinstance(source, Adapter) else None
        return self.cache.get_or_build(cache_key(source), build, keep_alive)

    def read_packed(self, source: AdapterSource, allow_pickle: bool = False) -> PackedAdapter:
        """Read, validate and pad ``source``, bypassing the cache."""
        return self.pack(load_adapter(source, allow_pickle=allow_pickle))

    def pack(self, adapter: Adapter) -> PackedAdapter:
        """Validate ``adapter`` against the capacity and pad it into slot layout (host memory; no slot is written)."""
        return self.layout.pack(self._checked(adapter), pin_memory=self._pin)

    def _checked(self, adapter: Adapter) -> Adapter:
        """Checks that need the model, and DoRA resolved against the base weights (see :mod:`loraswap.dora`):
        its shapes are validated first, its magnitude-over-norm is computed once here (the host cache keeps it)."""
        check_saved_base_weights(adapter, self._base_weight, self.layout.placements)
        if not adapter.has_dora:
            return adapter
        self.layout.validate(adapter, cast=True)
        return resolve_dora(adapter, self._base_weight, self._major_in)

    def _major_in(self, name: str) -> bool:
        """Whether target layer ``name``'s base weight is stored ``[in, out]`` (Conv1D, Embedding)."""
        return isinstance(self.model.get_submodule(name), (SlotConv1D, SlotEmbedding))

    def _base_weight(self, name: str) -> torch.Tensor:
        """The weight of target layer ``name`` that a base weight saved beside its adapter must equal."""
        return self.model.get_submodule(name).base_layer.weight

    def load(self, source: AdapterSource, slot: int = 0, *, allow_pickle: bool = False) -> None:
        """Hot-swap ``source`` into ``slot``: transactional, cached, no recompilation.

        Safe while forwards run when no row reads ``slot``; otherwise it waits for ``lock``.
        Without a host cache (``cache_bytes=0``) on CPU, the adapter is read (into a buffer this thread reuses)
        and validated, then copied straight into the slot: no padded host copy is built.
        """
        self.router.check_slot(slot)
        if self.cache.max_bytes or self._copy_stream is not None:
            self._write_packed(self.packed(source, allow_pickle=allow_pickle), slot)
            return
        adapter = self._checked(load_adapter(source, allow_pickle=allow_pickle, scratch=self._read_buffer()))
        self.layout.validate(adapter, cast=True)

        def write(*rows: tuple[torch.Tensor, ...]) -> None:
            self.layout.fill(adapter, *rows)

        self._write_slot(slot, adapter.source, write, dora=adapter.has_dora)

    def _read_buffer(self) -> ReadBuffer:
        """This thread's read buffer: a load reads, validates and writes an adapter before the thread reads another."""
        buffer = getattr(self._read_buffers, "buffer", None)
        if buffer is None:
            buffer = self._read_buffers.buffer = ReadBuffer()
        return buffer

    def load_packed(self, packed: PackedAdapter, slot: int = 0) -> None:
        """Copy an adapter that :meth:`pack` (or :meth:`packed`) prepared into ``slot``: the write half of ``load``."""
        self.router.check_slot(slot)
        check_packed_for(packed, self.layout)
        self._write_packed(packed, slot)

    def _write_packed(self, packed: PackedAdapter, slot: int) -> None:
        """:meth:`load_packed` after its checks (a warm ``load``'s path: its own cache packed for this layout)."""
        destinations = self._copy_destinations(slot, packed.live_rows)

        def write(*_rows: tuple[torch.Tensor, ...]) -> None:
            torch._foreach_copy_(destinations, packed.copy_sources, non_blocking=True)

        self._write_slot(slot, packed.source, write, dora=packed.has_dora)

    def _copy_destinations(self, slot: int, live_rows: LiveRows) -> tuple[torch.Tensor, ...]:
        """:meth:`SlotLayout.copy_views` of ``slot``'s row, kept per (slot, live rows): a warm swap then builds no
        view (a few distinct live-row shapes per slot in practice; the dict is emptied past a bound)."""
        key = (slot, live_rows)
        destinations = self._destinations.get(key)
        if destinations is None:
            if len(self._destinations) >= MAX_KEPT_DESTINATIONS:
                self._destinations.clear()
            destinations = self.layout.copy_views(*self._rows[slot], live_rows)
            self._destinations[key] = destinations
        return destinations

    def _write_slot(self, slot: int, source: str, write: SlotWrite, dora: bool = False) -> None:
        """``write`` a validated adapter into ``slot``: without ``lock`` when no row reads ``slot``."""
        self._check_layout()
        with self._write_lock:
            if slot not in self._read_slots:
                self._write_rows(slot, write, slot_is_read=False)
                self._set_loaded(slot, source, dora)
                return
        with self.lock, self._write_lock:
            if dora and slot in self._partial_slots:
                raise DoraStrengthError(
                    f"{source} is DoRA and slot {slot} is read at a strength other than 1 (blend); DoRA's norm "
                    "depends on the strength, so it is served at strength 0 or 1 only: route the rows to the slot "
                    "at weight 1 (route/activate, or blend with 1.0) before loading it there"
                )
            self._write_rows(slot, write, slot_is_read=slot in self._read_slots)
            self._set_loaded(slot, source, dora)

    def _set_loaded(self, slot: int, source: str, dora: bool) -> None:
        self._loaded[slot] = source
        if dora:
            self._dora_slots.add(slot)
        else:
            self._dora_slots.discard(slot)

    def _write_rows(self, slot: int, write: SlotWrite, slot_is_read: bool) -> None:
        """Run ``write(weights, scales, live)`` on ``slot``'s rows; on CUDA on the side stream, which orders every
        slot write."""
        if self._copy_stream is None:
            write(*self._rows[slot])
            return
        compute = torch.cuda.current_stream(self._copy_stream.device)
        if slot_is_read:
            self._copy_stream.wait_stream(compute)  # forwards already queued read this slot: write after them
        with torch.cuda.stream(self._copy_stream):
            write(*self._rows[slot])
        compute.wait_stream(self._copy_stream)  # an event: work queued from now on sees the whole write

    def prefetch(self, source: AdapterSource, *, allow_pickle: bool = False) -> Future:
        """Read, validate and pad ``source`` into the host cache on a background thread.

        The returned future gives the packed adapter or raises the load's :class:`HotswapError`;
        a ``load`` of the same source while it runs waits for it instead of reading twice.
        """
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraswap-prefetch")
        # this process's cache only, never a subclass's collective (TensorParallelSlots agrees in ``packed``)
        return self._prefetcher.submit(AdapterSlots.packed, self, source, allow_pickle=allow_pickle)

    def unload(self, slot: int = 0) -> None:
        """Zero ``slot``: rows routed to it get the base model's output."""
        self.router.check_slot(slot)
        self._check_layout()
        with self.lock, self._write_lock:
            self._write_rows(slot, self.layout.zero_rows, slot in self._read_slots)
            self._loaded.pop(slot, None)
            self._dora_slots.discard(slot)

    def activate(self, slot: int) -> None:
        """Every row uses ``slot``."""
        self._check_layout()
        with self.lock, self._write_lock:
            self.router.activate(slot)
            self._set_read_slots(frozenset({slot}), routed=None, partial=frozenset())

    def route(self, ids: Sequence[int], *, per_token: bool = False) -> None:
        """Row ``i`` (or packed token ``i`` with ``per_token=True``) uses slot ``ids[i]``; -1 = base model only.

        Give exactly one id per row of the next forward's batch (per token: one per packed token). A row
        past ``len(ids)`` gets the base model, and ids past the batch are ignored, so a short or long list
        serves wrong rows silently: attach with ``check_rows=True`` and such a forward raises instead.
        """
        self._check_layout()
        with self.lock, self._write_lock:
            self.router.route(ids, per_token=per_token)
            read = frozenset(int(slot) for slot in ids) - {-1}
            self._set_read_slots(read, routed=(len(ids), "token" if per_token else "row"), partial=frozenset())

    def blend(self, weights: BlendWeights | Sequence[BlendWeights]) -> None:
        """Every row (or row ``i``, given a list: one mapping per row, as in ``route``) uses a weighted sum of slots."""
        self._check_layout()
        with self.lock, self._write_lock:
            rows = [weights] if isinstance(weights, Mapping) else weights
            partial = _partial_slots(rows)
            self._check_dora_strengths(partial, rows)
            self.router.blend(weights)
            self._set_read_slots(_weighted_slots(rows), routed=_list_rows(weights), partial=partial)

    def _check_dora_strengths(self, partial: frozenset[int], rows: Sequence[BlendWeights]) -> None:
        """Refuse a DoRA slot read at a strength other than 0 or 1 (see :mod:`loraswap.dora`)."""
        refused = sorted(partial & self._dora_slots)
        if not refused:
            return
        slot = refused[0]
        weight = next(float(row[key]) for row in rows for key in row if int(key) == slot and float(row[key]) not in (0.0, 1.0))
        raise DoraStrengthError(
            f"slot {slot} holds a DoRA adapter ({self._loaded.get(slot)}) and blend gives it strength {weight}; DoRA's "
            "magnitude-over-norm was computed at strength 1 and PEFT recomputes it at another scale, so loraswap "
            "serves DoRA at strength 0 or 1 only: use strength 1 (or 0), or a plain LoRA adapter to scale"
        )

    def _set_read_slots(
        self, read_slots: frozenset[int], routed: tuple[int, str] | None, partial: frozenset[int]
    ) -> None:
        """Record which slots rows now read, and how many rows (None: any number) the routing was given; on CUDA,
        later slot writes also wait for the forwards queued before this change, which may still read a slot
        that is no longer read."""
        if self._copy_stream is not None:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self._copy_stream.device))
        self._read_slots = read_slots
        self._partial_slots = partial
        self._routed = routed

    def _check_forward_rows(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """``check_rows``: refuse a forward whose batch has another row (or token) count than the routing was given.

        Runs outside the compiled graph (eagerly, before it), so the routed count is never a value dynamo guards on.
        """
        if self._routed is None:
            return
        count, unit = self._routed
        batch = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
        if batch is None:
            return
        if unit == "row":
            got = batch.shape[0] if batch.dim() > 1 else 1
        else:
            got = batch.numel() // (batch.shape[-1] if batch.is_floating_point() and batch.dim() > 1 else 1)
        if got != count:
            raise SlotError(
                f"the forward's batch has {got} {unit}s but the last route()/blend() gave {count} (check_rows=True): "
                f"rows past the list would get the base model and extra entries would be ignored; route one id per "
                f"{unit} (-1 for the base model) before this forward"
            )

    def _check_layout(self) -> None:
        if self._sentinel_buffers["lora_A"].data_ptr() != self._sentinel_ptr:
            raise LayoutChangedError(
                "the slot buffers were replaced after attach (the model was moved or cast); "
                "call .to()/.half() before loraswap.attach, then attach again on a fresh model"
            )

    def __repr__(self) -> str:
        return (
            f"AdapterSlots(layers={len(self.layout.placements)}, slots={self.capacity.slots}, "
            f"slot_bytes={self.layout.slot_nbytes}, loaded={self._loaded})"
        )


def _list_rows(weights: BlendWeights | Sequence[BlendWeights]) -> tuple[int, str] | None:
    """How many rows a per-row blend list names (None for one mapping, which every row uses)."""
    return None if isinstance(weights, Mapping) else (len(weights), "row")


def _partial_slots(rows: Iterable[BlendWeights]) -> frozenset[int]:
    """Slots some row reads at a weight other than 0 and 1."""
    return frozenset(int(slot) for row in rows for slot, weight in row.items() if float(weight) not in (0.0, 1.0))


def _weighted_slots(rows: Iterable[BlendWeights]) -> frozenset[int]:
    return frozenset(int(slot) for row in rows for slot, weight in row.items() if float(weight) != 0.0)
