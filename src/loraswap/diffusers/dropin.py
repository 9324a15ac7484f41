"""The drop-in for diffusers users: ``pipe.enable_lora_hotswap`` + ``pipe.load_lora_weights(..., hotswap=True)``,
limits lifted.

:func:`enable_lora_hotswap` attaches and routes the pipeline's own ``load_lora_weights``,
``unload_lora_weights``, ``set_adapters`` and ``delete_adapters`` to loraswap (see its docstring).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ..capacity import Capacity
from ..errors import CapacityError, HotswapError, RankOverCapacityError, SlotError
from ..layers import slot_layer_class
from .pipeline import PipelineSlots, attach, capacities_for
from .reading import PipelineSource, is_text_encoder, lora_components, source_cache_key

# Layers that diffusers and kohya trainers put LoRAs on, used by enable_lora_hotswap when the caller
# names neither the adapters nor target_modules (PEFT meaning: name suffixes).
DEFAULT_DENOISER_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_in", "proj_out", "proj_mlp", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
DEFAULT_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")



def enable_lora_hotswap(
    pipe: Any,
    target_rank: int,
    *,
    adapters: Iterable[PipelineSource] | None = None,
    target_modules: Mapping[str, Sequence[str] | str] | None = None,
    slots: int = 1,
    cache_bytes: int | None = None,
    check_compiled: str = "error",
) -> PipelineSlots:
    """Attach loraswap to ``pipe`` and route its LoRA methods to it; call before compiling.

    Routing: the pipeline *instance* gets four attributes that shadow the class's methods (the
    class and every other pipeline are untouched; ``type(pipe).load_lora_weights`` is still diffusers'):

    - ``pipe.load_lora_weights(source, adapter_name=None, hotswap=False, **kwargs)`` ->
      :meth:`PipelineSlots.load` into the slot named ``adapter_name``, then activates it. With
      ``hotswap=True`` it replaces the named adapter (or, unnamed, the last one loaded), text
      encoders included; with ``hotswap=False`` it takes a free slot. ``kwargs`` (``weight_name``,
      ``subfolder``, ...) go to diffusers' ``lora_state_dict``.
    - ``pipe.unload_lora_weights()`` -> empties every slot.
    - ``pipe.set_adapters(names, adapter_weights=None)`` -> :meth:`PipelineSlots.blend`.
    - ``pipe.delete_adapters(names)`` -> empties those slots.

    Capacity: ``adapters`` (the LoRAs to be served) gives each component the union of their targets;
    else ``target_modules`` (component -> PEFT target_modules) or the usual LoRA layers of each
    component (attention, feed-forward and projection layers; q/k/v/out_proj/fc1/fc2 in text
    encoders), each padded to ``target_rank``. Lifted against diffusers: text encoders hot-swap,
    a LoRA may target layers the first did not, a rank above ``target_rank`` raises instead of
    recompiling, kohya per-module alphas load, and a failed load leaves the loaded adapter in place.
    ``check_compiled`` ("error", "warn", "ignore"), as in diffusers: a component compiled before this
    call compiles again at its next forward, once.
    """
    components = lora_components(pipe)
    compiled = sorted(name for name, module in components.items() if _is_compiled(module))
    if compiled and check_compiled != "ignore":
        message = f"{compiled} already compiled: call enable_lora_hotswap before compiling, or they recompile once"
        if check_compiled == "error":
            raise HotswapError(message)
        warnings.warn(message, stacklevel=2)
    if adapters is not None:
        capacities, read = capacities_for(pipe, adapters, slots=slots, min_rank=target_rank)
    else:
        capacities, read = {}, []
        for name, module in components.items():
            targets = (target_modules or {}).get(name) or (
                DEFAULT_TEXT_ENCODER_TARGETS if is_text_encoder(module) else DEFAULT_DENOISER_TARGETS
            )
            capacity = Capacity(max_rank=target_rank, target_modules=targets, slots=slots)
            capacities.update(_wrappable_only(name, module, capacity))
    pipeline_slots = attach(pipe, capacities, slots, cache_bytes=cache_bytes)
    for source, adapter in read:
        key = source_cache_key(source, {})
        if key is not None:
            pipeline_slots.cache.put(key, pipeline_slots.pack(adapter))
    _route_lora_methods(pipe, pipeline_slots, target_rank)
    return pipeline_slots


def _is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod")


def _wrappable_only(name: str, module: nn.Module, capacity: Capacity) -> dict[str, Capacity]:
    """The default targets narrowed to the layers loraswap can wrap (Linear, Conv, Embedding), by full name."""
    names = tuple(
        sorted(n for n, m in module.named_modules() if n and capacity.matches(n) and slot_layer_class(m) is not None)
    )
    if not names:
        return {}
    return {name: Capacity(max_rank=capacity.max_rank, target_modules=names, slots=capacity.slots)}


class _AdapterNames:
    """The drop-in's adapter names -> slots, as diffusers names adapters (``default_0``, ``default_1``, ...)."""

    def __init__(self, slots: PipelineSlots) -> None:
        self.slots = slots
        self.by_name: dict[str, int] = {}
        self.last: str | None = None

    def slot_for_load(self, adapter_name: str | None, hotswap: bool) -> tuple[str, int]:
        if hotswap:
            name = adapter_name or self.last
            if name is None or name not in self.by_name:
                if not self.by_name and adapter_name is None:
                    return "default_0", 0
                raise SlotError(
                    f"hotswap=True needs the name of a loaded adapter, got {adapter_name!r}; loaded: "
                    f"{sorted(self.by_name)}. Load it once with hotswap=False first"
                )
            return name, self.by_name[name]
        name = adapter_name or f"default_{len(self.by_name)}"
        if name in self.by_name:
            raise SlotError(f"adapter name {name!r} is already loaded; pass hotswap=True to replace it")
        free = [s for s in range(self.slots.slots) if s not in self.by_name.values()]
        if not free:
            raise SlotError(
                f"all {self.slots.slots} slot(s) hold adapters ({sorted(self.by_name)}); pass hotswap=True with "
                "adapter_name to replace one, or enable_lora_hotswap(..., slots=N) for more"
            )
        return name, free[0]

    def slots_of(self, names: str | Sequence[str]) -> list[int]:
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.by_name:
                raise SlotError(f"no adapter named {name!r} is loaded; loaded: {sorted(self.by_name)}")
        return [self.by_name[name] for name in names]


def _route_lora_methods(pipe: Any, pipeline_slots: PipelineSlots, target_rank: int) -> None:
    names = _AdapterNames(pipeline_slots)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap=False, **kwargs):
        kwargs.pop("low_cpu_mem_usage", None)
        name, slot = names.slot_for_load(adapter_name, hotswap)
        try:
            pipeline_slots.load(pretrained_model_name_or_path_or_dict, slot, **kwargs)
        except RankOverCapacityError as err:  # say it in the drop-in's words: target_rank, not Capacity.max_rank
            raise CapacityError(
                f"layer {err.layer!r}: the LoRA's rank {err.rank} exceeds the rank {err.capacity_rank} that "
                f"enable_lora_hotswap(target_rank={target_rank}) padded it to; call enable_lora_hotswap with "
                f"target_rank={err.rank} (or more) before compiling"
            ) from err
        names.by_name[name] = slot
        names.last = name
        pipeline_slots.activate(slot)

    def unload_lora_weights(self, *args, **kwargs):
        for slot in sorted(set(names.by_name.values())):
            pipeline_slots.unload(slot)
        names.by_name.clear()
        names.last = None

    def set_adapters(self, adapter_names, adapter_weights=None):
        slot_ids = names.slots_of(adapter_names)
        if adapter_weights is None:
            adapter_weights = [1.0] * len(slot_ids)
        elif not isinstance(adapter_weights, Sequence):
            adapter_weights = [adapter_weights] * len(slot_ids)
        if any(isinstance(weight, Mapping) for weight in adapter_weights):
            raise HotswapError("per-component or per-block adapter_weights are not supported by loraswap; pass floats")
        pipeline_slots.blend(dict(zip(slot_ids, map(float, adapter_weights))))

    def delete_adapters(self, adapter_names):
        for name, slot in zip([adapter_names] if isinstance(adapter_names, str) else adapter_names,
                              names.slots_of(adapter_names)):  # fmt: skip
            pipeline_slots.unload(slot)
            del names.by_name[name]

    for function in (load_lora_weights, unload_lora_weights, set_adapters, delete_adapters):
        object.__setattr__(pipe, function.__name__, types.MethodType(function, pipe))
    object.__setattr__(pipe, "loraswap_slots", pipeline_slots)
