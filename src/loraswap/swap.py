"""Where a swap happens: :class:`AdapterSlots`, the handle ``attach`` returns.

A load resolves the adapter to a :class:`~loraswap.layout.PackedAdapter` (from the host cache,
or read, validated and padded on a miss), then copies it into the slot's row of each flat
buffer. Everything that can fail happens before that copy, so a failed load leaves every
tensor of the model bit-for-bit as it was. No verb changes a shape, dtype, device, storage or
Python attribute that the compiled graph reads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from .adapter import Adapter, AdapterSource, load_adapter
from .cache import AdapterCache, cache_key
from .capacity import Capacity
from .errors import LayoutChangedError
from .layers import SlotLayer
from .layout import PackedAdapter, SlotLayout, SlotStorage
from .routing import BlendWeights, Router


class AdapterSlots:
    """Loads adapters into slots, activates, routes and blends them, and keeps the host cache.

    ``lock`` serialises the verbs; a serving thread that runs forwards while another thread
    swaps holds it around each forward so that no forward sees a routing change halfway.
    Loading into a slot that no row reads is safe without it.
    """

    def __init__(
        self,
        model: nn.Module,
        capacity: Capacity,
        layout: SlotLayout,
        storage: SlotStorage,
        router: Router,
        cache: AdapterCache,
    ) -> None:
        self.model = model
        self.capacity = capacity
        self.layout = layout
        self.storage = storage
        self.router = router
        self.cache = cache
        self.lock = threading.RLock()
        self._loaded: dict[int, str] = {}
        self._prefetcher: ThreadPoolExecutor | None = None
        self._sentinel = self._first_layer()
        self._sentinel_ptr = self._sentinel.lora_A.data_ptr()
        self._pin = any(g.device.type == "cuda" for g in layout.groups)

    def _first_layer(self) -> SlotLayer:
        return next(m for m in self.model.modules() if isinstance(m, SlotLayer))

    @property
    def loaded(self) -> dict[int, str]:
        """Slot -> source of the adapter loaded there."""
        return dict(self._loaded)

    def packed(self, source: AdapterSource, *, allow_pickle: bool = False) -> PackedAdapter:
        """The adapter in slot layout: from the cache, else read, validated, padded and cached."""
        key = cache_key(source)
        packed = self.cache.get(key)
        if packed is None:
            adapter = load_adapter(source, allow_pickle=allow_pickle)
            packed = self.layout.pack(adapter, pin_memory=self._pin)
            self.cache.put(key, packed, keep_alive=source if isinstance(source, Adapter) else None)
        return packed

    def load(self, source: AdapterSource, slot: int = 0, *, allow_pickle: bool = False) -> None:
        """Hot-swap ``source`` into ``slot``: transactional, cached, no recompilation."""
        self.router.check_slot(slot)
        packed = self.packed(source, allow_pickle=allow_pickle)
        with self.lock:
            self._check_layout()
            for weights, scales, new_weights, new_scales in zip(
                self.storage.weights, self.storage.scales, packed.weights, packed.scales
            ):
                weights[slot].copy_(new_weights, non_blocking=True)
                scales[slot].copy_(new_scales, non_blocking=True)
            self._loaded[slot] = packed.source

    def prefetch(self, source: AdapterSource, *, allow_pickle: bool = False) -> Future:
        """Read, validate and pad ``source`` into the host cache on a background thread."""
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraswap-prefetch")
        return self._prefetcher.submit(self.packed, source, allow_pickle=allow_pickle)

    def unload(self, slot: int = 0) -> None:
        """Zero ``slot``: rows routed to it get the base model's output."""
        self.router.check_slot(slot)
        with self.lock:
            self._check_layout()
            for weights, scales in zip(self.storage.weights, self.storage.scales):
                weights[slot].zero_()
                scales[slot].zero_()
            self._loaded.pop(slot, None)

    def activate(self, slot: int) -> None:
        """Every row uses ``slot``."""
        with self.lock:
            self.router.activate(slot)

    def route(self, ids: Sequence[int], *, per_token: bool = False) -> None:
        """Row ``i`` (or packed token ``i`` with ``per_token=True``) uses slot ``ids[i]``; -1 = base model only."""
        with self.lock:
            self.router.route(ids, per_token=per_token)

    def blend(self, weights: BlendWeights | Sequence[BlendWeights]) -> None:
        """Every row (or row ``i``, given a list) uses the weighted sum of the given slots."""
        with self.lock:
            self.router.blend(weights)

    def _check_layout(self) -> None:
        if self._sentinel.lora_A.data_ptr() != self._sentinel_ptr:
            raise LayoutChangedError(
                "the slot buffers were replaced after attach (the model was moved or cast); "
                "call .to()/.half() before loraswap.attach, then attach again on a fresh model"
            )

    def __repr__(self) -> str:
        return (
            f"AdapterSlots(layers={len(self.layout.placements)}, slots={self.capacity.slots}, "
            f"slot_bytes={self.layout.slot_nbytes}, loaded={self._loaded})"
        )
