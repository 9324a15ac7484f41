"""Attaching slots to a pipeline's components and swapping in all of them at once.

:func:`attach` gives every component that diffusers loads LoRAs into (``pipe._lora_loadable_modules``:
unet or transformer, text_encoder, text_encoder_2, ...) its own slot layers (core
:func:`loraswap.attach`) and returns a :class:`PipelineSlots` with the verbs of
:class:`~loraswap.AdapterSlots` over all components at once. A load is transactional across the
pipeline: every component's part is read, validated and padded before any slot is written.

``attach(..., mode="fused")`` gives a :class:`FusedPipelineSlots` instead: each load merges the LoRA
into the components' own weights (core fused mode), so denoising steps cost what the base pipeline
costs, for one merge per swap; it suits serving one LoRA per request.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ..adapter import Adapter
from ..attach import attach as attach_model
from ..cache import AdapterCache, default_cache_bytes
from ..capacity import Capacity, check_targets_exist, union_of_ranks
from ..errors import CapacityError, HotswapError, ModeError, SlotError
from ..fused import FusedAdapter, FusedSlots
from ..layers import SlotLayer
from ..layout import PackedAdapter
from ..routing import BlendWeights
from ..swap import AdapterSlots
from .prompts import CallLayout, call_layout, component_rows, route_calls
from .reading import (
    PipelineAdapter,
    PipelineSource,
    is_text_encoder,
    lora_components,
    read_pipeline_adapter,
    source_cache_key,
)


@dataclass(frozen=True)
class PackedPipelineAdapter:
    """A pipeline adapter laid out as one slot row per component (None: the adapter leaves it alone)."""

    components: Mapping[str, PackedAdapter | FusedAdapter | None]
    source: str

    @property
    def nbytes(self) -> int:
        return sum(packed.nbytes for packed in self.components.values() if packed is not None)




class PipelineSlots:
    """The :class:`~loraswap.AdapterSlots` verbs over every LoRA-loadable component of a pipeline.

    ``components`` maps a component name (``"unet"``, ``"text_encoder"``, ...) to its own
    :class:`AdapterSlots`, for per-component routing. A load reads and validates every component's
    part before it writes any slot: it either completes in all components or changes none.
    A component the adapter does not target gets its slot emptied, so it runs as the base model.
    Every verb takes ``lock`` (then each component's): a serving thread that holds ``lock`` around each
    pipeline call never sees a swap halfway through the components.
    """

    def __init__(self, pipe: Any, components: Mapping[str, AdapterSlots | FusedSlots], cache: AdapterCache) -> None:
        self.pipe = pipe
        self.components = dict(components)
        self.cache = cache
        self.lock = threading.RLock()
        self.slots = min(s.capacity.slots for s in self.components.values())
        self._loaded: dict[int, str] = {}
        self._prefetcher: ThreadPoolExecutor | None = None
        self._rows: BlendWeights | list[BlendWeights] | None = {0: 1.0}  # per prompt; None: routed per token
        self._written: tuple | None = None  # the rows and call layout the components' tables hold
        self.muted: frozenset[str] = frozenset()  # components routed to nothing: the drop-in's fuse_lora merged them
        route_calls(pipe, self._call)

    # What an AdapterPool reads (loraswap.pool.PoolSlots): rows are prompts, routed per call
    @property
    def slot_count(self) -> int:
        return self.slots

    @property
    def fused(self) -> bool:
        return bool(self.components) and all(isinstance(c, FusedSlots) for c in self.components.values())

    max_rows = None
    max_blend = None

    @property
    def loaded(self) -> dict[int, str]:
        """Slot -> source of the adapter loaded there."""
        return dict(self._loaded)

    def read(self, source: PipelineSource, *, allow_pickle: bool = False, **hub_kwargs: Any) -> PipelineAdapter:
        return read_pipeline_adapter(self.pipe, source, allow_pickle=allow_pickle, **hub_kwargs)

    def packed(self, source: PipelineSource, *, allow_pickle: bool = False, **hub_kwargs: Any) -> PackedPipelineAdapter:
        """``source`` laid out for every component: from the cache, else read, validated in every component, padded."""

        def build() -> PackedPipelineAdapter:
            return self.pack(self.read(source, allow_pickle=allow_pickle, **hub_kwargs))

        key = source_cache_key(source, hub_kwargs, allow_pickle)
        if key is None:
            return build()
        keep_alive = source if isinstance(source, (Adapter, PipelineAdapter)) else None
        return self.cache.get_or_build(key, build, keep_alive)

    def pack(self, adapter: PipelineAdapter) -> PackedPipelineAdapter:
        """Validate and lay out every component's part (host memory only: nothing is written before all succeed)."""
        for name in adapter.components:
            if name not in self.components:
                raise CapacityError(
                    f"{adapter.source}: targets {name!r}, which attach() gave no slots; attach with this LoRA among "
                    f"the adapters (or a capacity for {name!r})"
                )
        packed = {
            name: None if (part := adapter.components.get(name)) is None else component.pack(part)
            for name, component in self.components.items()
        }
        return PackedPipelineAdapter(packed, adapter.source)

    def load(
        self, source: PipelineSource, slot: int = 0, *, allow_pickle: bool = False, **hub_kwargs: Any
    ) -> PackedPipelineAdapter:
        """Hot-swap ``source`` into ``slot`` of every component: transactional, cached, no recompilation.
        Returns what was written (``components[name]`` is None where the LoRA leaves a component alone)."""
        self._check_slot(slot)
        packed = self.packed(source, allow_pickle=allow_pickle, **hub_kwargs)
        self.load_packed(packed, slot)
        return packed

    def load_packed(self, packed: PackedPipelineAdapter, slot: int = 0) -> None:
        """Write what :meth:`packed` returned into ``slot`` of every component."""
        self._check_slot(slot)
        self._check_layouts()
        with self._all_locks():
            self._write(packed, slot)
            self._loaded[slot] = packed.source

    def _write(self, packed: PackedPipelineAdapter, slot: int) -> None:
        """Every component's part into ``slot``; slot-mode copies cannot fail once packed."""
        for name, component in self.components.items():
            _write_slot(component, packed.components[name], slot)

    def prefetch(self, source: PipelineSource, *, allow_pickle: bool = False, **hub_kwargs: Any) -> Future:
        """Read, validate and pad ``source`` into the host cache on a background thread."""
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraswap-prefetch")
        return self._prefetcher.submit(self.packed, source, allow_pickle=allow_pickle, **hub_kwargs)

    def unload(self, slot: int = 0) -> None:
        """Empty ``slot`` in every component."""
        self._check_slot(slot)
        self._check_layouts()
        with self._all_locks():
            for component in self.components.values():
                component.unload(slot)
            self._loaded.pop(slot, None)

    def activate(self, slot: int) -> None:
        """Every row of every component uses ``slot``."""
        self._check_slot(slot)
        self._check_layouts()
        with self._all_locks():
            for component in self.components.values():
                component.activate(slot)
            self._rows, self._written = {slot: 1.0}, None

    def route(self, ids: Sequence[int], *, per_token: bool = False) -> None:
        """Prompt ``i`` of the next pipeline calls uses slot ``ids[i]`` (-1: base model), in every component.

        Every row a prompt produces is routed: its text-encoder rows, and its denoiser rows for each
        image (``num_images_per_prompt``) and each guidance branch (see :mod:`.prompts`). A component
        called directly sees row ``i`` routed to ``ids[i]``. ``per_token=True`` routes packed token
        positions of every component as given, with no per-prompt layout.
        """
        self._check_layouts()
        if per_token:
            with self._all_locks():
                for component in self.components.values():
                    component.route(ids, per_token=True)
                self._rows, self._written = None, None
            return
        for slot in ids:
            if slot != -1:
                self._check_slot(slot)
        self.blend([{} if slot == -1 else {slot: 1.0} for slot in ids])

    def blend(self, weights: BlendWeights | Sequence[BlendWeights]) -> None:
        """Every prompt (or prompt ``i``, given a list) of the next pipeline calls uses the weighted sum of
        the given slots, in every row it produces in every component (see :meth:`route`)."""
        rows = dict(weights) if isinstance(weights, Mapping) else [dict(row) for row in weights]
        self._check_layouts()
        with self._all_locks():
            for name, component in self.components.items():
                component.blend(_unrouted(rows) if name in self.muted else rows)
            self._rows, self._written = rows, None

    def _call(self, pipeline_call: Callable, args: tuple, kwargs: dict) -> Any:
        """One pipeline call: every component's routing laid out for its batch, the scale a routing weight."""
        layout, args, kwargs = call_layout(self.pipe, pipeline_call, args, kwargs)
        with self.lock:
            self._lay_out(layout)
            return pipeline_call(*args, **kwargs)

    def _lay_out(self, layout: CallLayout) -> None:
        if self._rows is None:
            if layout.scale != 1.0:
                raise SlotError(
                    f"a LoRA scale of {layout.scale} cannot apply to per-token routing; route per prompt "
                    "(route(ids) without per_token) or drop the scale"
                )
            return
        if self.muted and layout.scale != 1.0:
            raise ModeError(
                f"a LoRA scale of {layout.scale} was passed, but fuse_lora merged the LoRA into {sorted(self.muted)} "
                "at its own lora_scale; call unfuse_lora() for per-call strengths"
            )
        if self._written == (id(self._rows), layout):
            return
        with self._all_locks():
            for name, component in self.components.items():
                rows = component_rows(self._rows, layout, denoiser=not is_text_encoder(getattr(self.pipe, name)))
                component.blend(_unrouted(rows) if name in self.muted else rows)
            self._written = (id(self._rows), layout)

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise SlotError(
                f"slot {slot!r} is outside the {self.slots} slot(s) allocated; use 0..{self.slots - 1} "
                "or attach with slots= larger"
            )

    def _check_layouts(self) -> None:
        """Raise :class:`LayoutChangedError` before any component changes when one was moved or cast after attach."""
        for component in self.components.values():
            component._check_layout()

    def _all_locks(self):
        return _Locks([self.lock, *(component.lock for component in self.components.values())])

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}: {len(s.layout.placements)} layers" for name, s in self.components.items())
        return f"PipelineSlots({parts}, slots={self.slots}, loaded={self._loaded})"


class FusedPipelineSlots(PipelineSlots):
    """:class:`PipelineSlots` whose components run in fused mode (:class:`~loraswap.FusedSlots`): the active
    LoRA is merged into the unet/transformer and text-encoder weights, so a denoising step costs exactly
    the base pipeline's. ``route`` and ``blend`` raise :class:`~loraswap.ModeError`.

    A merge can still fail after validation when a merged weight overflows its dtype; the failing
    component restores itself, and the components merged before it are merged back here, so a load
    or activate completes in every component or changes none.
    """

    components: dict[str, FusedSlots]

    def _lay_out(self, layout: CallLayout) -> None:
        if layout.scale != 1.0:
            raise ModeError(
                f"a LoRA scale of {layout.scale} was passed, but fused mode merged the LoRA at scale 1.0; "
                "attach with mode='slots' for per-call strengths"
            )

    def _write(self, packed: PackedPipelineAdapter, slot: int) -> None:
        previous = {name: component.staged_in(slot) for name, component in self.components.items()}
        self._in_every_component(
            lambda name, component: _write_slot(component, packed.components[name], slot),
            undo=lambda name, component: _write_slot(component, previous[name], slot),
        )

    def activate(self, slot: int) -> None:
        self._check_slot(slot)
        self._check_layouts()
        with self._all_locks():
            previous = {name: component.active for name, component in self.components.items()}
            self._in_every_component(
                lambda name, component: component.activate(slot),
                undo=lambda name, component: component.activate(previous[name]),
            )

    def _in_every_component(
        self, step: Callable[[str, FusedSlots], None], undo: Callable[[str, FusedSlots], None]
    ) -> None:
        """``step`` in every component; when one raises, ``undo`` in those already done, newest first."""
        done = []
        try:
            for name, component in self.components.items():
                step(name, component)
                done.append((name, component))
        except BaseException:
            for name, component in reversed(done):
                undo(name, component)
            raise


def _unrouted(rows: BlendWeights | Sequence[BlendWeights]) -> BlendWeights | list[BlendWeights]:
    """``rows`` with every row on the base model."""
    return {} if isinstance(rows, Mapping) else [{} for _ in rows]


class _Locks:
    def __init__(self, locks) -> None:
        self.locks = locks

    def __enter__(self) -> None:
        for lock in self.locks:
            lock.acquire()

    def __exit__(self, *exc) -> None:
        for lock in reversed(self.locks):
            lock.release()


def _write_slot(component: AdapterSlots | FusedSlots, packed: PackedAdapter | FusedAdapter | None, slot: int) -> None:
    """One component's part into ``slot``, or empty the slot where the LoRA leaves the component alone."""
    if packed is None:
        component.unload(slot)
    else:
        component.load_packed(packed, slot)


def capacities_for(
    pipe: Any,
    adapters: Iterable[PipelineSource],
    *,
    slots: int = 1,
    min_rank: int = 1,
    per_layer_rank: bool = False,
    max_batch: int | None = None,
    max_blend: int = 1,
    allow_pickle: bool = False,
) -> tuple[dict[str, Capacity], list[tuple[PipelineSource, PipelineAdapter]]]:
    """Per component: the union of the adapters' targets and their largest rank (at least ``min_rank``);
    with ``per_layer_rank=True`` each layer is sized to the largest rank any adapter gives it;
    ``max_blend`` as in :class:`~loraswap.Capacity` (how many slots one prompt may mix)."""
    read = [(source, read_pipeline_adapter(pipe, source, allow_pickle=allow_pickle)) for source in adapters]
    if not read:
        raise CapacityError("loraswap.diffusers.attach needs at least one LoRA (or a Capacity)")
    components = lora_components(pipe)
    capacities = {}
    for name, module in components.items():
        parts = [adapter.components[name] for _, adapter in read if name in adapter.components]
        if not parts:
            continue
        ranks = union_of_ranks(parts)
        check_targets_exist(ranks, module, where=f"component {name!r}")
        extra = {} if max_batch is None else {"max_batch": max_batch}
        capacities[name] = Capacity(
            max_rank=max(max(ranks.values()), min_rank),
            target_modules=tuple(sorted(ranks)),
            slots=slots,
            max_blend=max_blend,
            lora_bias=any(part.has_bias for part in parts),
            dora=any(part.has_dora for part in parts),
            layer_ranks={layer: max(rank, min_rank) for layer, rank in ranks.items()} if per_layer_rank else {},
            **extra,
        )
    return capacities, read


def attach(
    pipe: Any,
    adapters_or_capacity: Iterable[PipelineSource] | Capacity | Mapping[str, Capacity],
    slots: int = 1,
    *,
    mode: Literal["slots", "fused"] = "slots",
    per_layer_rank: bool = False,
    max_blend: int = 1,
    cache_bytes: int | None = None,
    allow_pickle: bool = False,
) -> PipelineSlots:
    """Give every LoRA-loadable component of ``pipe`` LoRA slots, in place, before compiling; slot 0 is active.

    ``adapters_or_capacity``: the LoRA files (paths, hub ids, state dicts) the service will serve, from
    which each component gets the union of their targets and their largest rank; or one
    :class:`Capacity` applied to every component it matches; or ``{component: Capacity}``.
    The adapters given are read once and kept packed in the host cache. ``per_layer_rank=True`` sizes
    each layer to the largest rank the adapters give it (less padded compute; a later LoRA of
    higher rank there does not fit). ``max_blend``: how many slots one prompt may mix (each prompt
    costs that many LoRAs; ``blend``/``set_adapters`` over more raise ``SlotError``).

    ``mode="fused"`` merges the active LoRA into the components' weights instead (a
    :class:`FusedPipelineSlots`): no per-step cost, a merge per swap, no ``route``/``blend``.
    """
    components = lora_components(pipe)
    _refuse_peft_layers(components)
    read: list[tuple[PipelineSource, PipelineAdapter]] = []
    if isinstance(adapters_or_capacity, (str, os.PathLike, Adapter, PipelineAdapter)) or (
        isinstance(adapters_or_capacity, Mapping)
        and not all(isinstance(value, Capacity) for value in adapters_or_capacity.values())
    ):
        adapters_or_capacity = [adapters_or_capacity]  # one LoRA, not a list of them
    if isinstance(adapters_or_capacity, Capacity):
        capacities = _matching_components(components, adapters_or_capacity)
    elif isinstance(adapters_or_capacity, Mapping) and all(
        isinstance(value, Capacity) for value in adapters_or_capacity.values()
    ):
        capacities = dict(adapters_or_capacity)
    else:
        capacities, read = capacities_for(
            pipe,
            adapters_or_capacity,
            slots=slots,
            per_layer_rank=per_layer_rank,
            max_blend=max_blend,
            allow_pickle=allow_pickle,
        )
    unknown = sorted(set(capacities) - set(components))
    if unknown:
        raise CapacityError(f"{unknown[0]!r} is not a LoRA-loadable component of this pipeline ({sorted(components)})")
    cache = AdapterCache(default_cache_bytes() if cache_bytes is None else cache_bytes)
    attached = {
        name: attach_model(components[name], capacity, mode=mode, cache_bytes=0) for name, capacity in capacities.items()
    }
    pipeline_slots = (FusedPipelineSlots if mode == "fused" else PipelineSlots)(pipe, attached, cache)
    for source, adapter in read:
        key = source_cache_key(source, {}, allow_pickle)
        if key is not None:
            cache.put(key, pipeline_slots.pack(adapter))
    return pipeline_slots


def _matching_components(components: Mapping[str, nn.Module], capacity: Capacity) -> dict[str, Capacity]:
    matching = {
        name: capacity
        for name, module in components.items()
        if any(name_ and capacity.matches(name_) for name_, _ in module.named_modules())
    }
    if not matching:
        raise CapacityError(
            f"no layer of any component ({sorted(components)}) matches target_modules={capacity.target_modules!r}"
        )
    return matching


def _refuse_peft_layers(components: Mapping[str, nn.Module]) -> None:
    for name, module in components.items():
        if any(isinstance(m, SlotLayer) for m in module.modules()):
            raise HotswapError(f"{name} already has loraswap slots; attach once per pipeline")
        if any(hasattr(m, "lora_A") and hasattr(m, "base_layer") for m in module.modules()):
            raise HotswapError(
                f"{name} holds LoRA layers loaded by diffusers/PEFT; call pipe.unload_lora_weights() first, "
                "then attach (loraswap loads the LoRAs itself)"
            )


