"""The drop-in for diffusers users: ``enable_lora_hotswap`` + ``load_lora_weights(..., hotswap=True)`` on a
pipeline, limits lifted (the model-level drop-in is :mod:`.model`; both are reached through diffusers'
own methods after :func:`loraswap.diffusers.patch`, see :mod:`.patch`).

:func:`enable_lora_hotswap` gives the pipeline *instance* loraswap-backed LoRA methods with diffusers'
signatures. As in diffusers, the capacity is sized at the first load unless ``adapters`` names the
LoRAs up front: each component gets the layers that LoRA targets plus its usual LoRA layers, padded
to ``target_rank``; compile after that first load.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ..capacity import Capacity
from ..errors import CapacityError, ModeError
from ..fused import FusedSlots
from ..layers import slot_layer_class
from .fusing import fuse_into_base
from .model import DEFAULT_DENOISER_TARGETS, ModelHotswap, enable_model_lora_hotswap
from .naming import NamedAdapters, check_enable, in_target_rank_words, take_over_peft_adapters
from .pipeline import PipelineSlots, attach, capacities_for
from .reading import (
    PipelineAdapter,
    PipelineSource,
    is_text_encoder,
    lora_components,
    read_pipeline_adapter,
    source_cache_key,
)

DEFAULT_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


class PipelineHotswap:
    """loraswap behind one pipeline's LoRA methods; ``slots`` is None until the first load (or ``adapters``)."""

    def __init__(
        self,
        pipe: Any,
        target_rank: int,
        target_modules: Mapping[str, Sequence[str] | str] | None,
        slot_count: int,
        cache_bytes: int | None,
    ) -> None:
        self.pipe = pipe
        self.target_rank = target_rank
        self.target_modules = dict(target_modules or {})
        self.cache_bytes = cache_bytes
        self.names = NamedAdapters(slot_count)
        self.slots: PipelineSlots | None = None
        self.components_of: dict[str, list[str]] = {}  # adapter name -> components it changes
        self.fused: dict[str, FusedSlots] = {}  # component -> what fuse_lora merged there; unload(0) unfuses

    def attach(self, capacities: Mapping[str, Capacity]) -> None:
        self.slots = attach(self.pipe, capacities, self.names.slot_count, cache_bytes=self.cache_bytes)
        self.names.target = self.slots

    def load(self, source: PipelineSource, adapter_name: str | None, hotswap: bool, hub_kwargs: Mapping[str, Any]) -> None:
        name, slot = self.names.slot_for_load(adapter_name, hotswap)
        if self.slots is None:
            source = read_pipeline_adapter(self.pipe, source, **hub_kwargs)
            self.attach(self.first_capacities([source]))
            hub_kwargs = {}
        with in_target_rank_words(self.target_rank):
            packed = self.slots.load(source, slot, **hub_kwargs)
        self.components_of[name] = [component for component, part in packed.components.items() if part is not None]
        self.names.loaded(name, slot, hotswap)

    def fuse(self, components: Sequence[str] | None, lora_scale: float, adapter_names: Sequence[str] | None) -> None:
        """diffusers' ``fuse_lora``: the active adapters (or ``adapter_names``) merged into the base weights of
        ``components`` (see :mod:`.fusing`), in every one or in none; their routing is emptied."""
        components = self._components_arg(components, "fuse_lora")
        weights = self.names.fused_weights(adapter_names, lora_scale)
        attached = {} if self.slots is None else self.slots.components
        fused: dict[str, FusedSlots] = {}
        try:
            for name in components:
                if name in attached and (handle := fuse_into_base(attached[name].model, weights, name)) is not None:
                    fused[name] = handle
        except BaseException:
            for handle in fused.values():
                handle.unload(0)
            raise
        if not fused:
            raise ModeError(f"fuse_lora found no loaded adapter active in {components} to fuse")
        self.fused = fused
        self._mute()

    def unfuse(self, components: Sequence[str] | None) -> None:
        """diffusers' ``unfuse_lora``: the base weights of ``components`` back bit for bit, their routing written back."""
        components = self._components_arg(components, "unfuse_lora")
        if not self.fused:
            raise ModeError("unfuse_lora called, but nothing is fused (call fuse_lora first)")
        for name in components:
            if name in self.fused:
                self.fused.pop(name).unload(0)
        self._mute()

    def unload_all(self) -> None:
        """diffusers' ``unload_lora_weights``: every adapter dropped; weights that ``fuse_lora`` merged stay merged."""
        self.fused = {}
        self.names.unload_all()
        if self.slots is not None:
            self.slots.muted = frozenset()

    def _mute(self) -> None:
        self.slots.muted = frozenset(self.fused)
        self.names.fused = bool(self.fused)
        self.names.write()

    def _components_arg(self, components: Sequence[str] | None, verb: str) -> list[str]:
        """``components`` as diffusers takes it: default from the pipeline class's own ``fuse_lora``/``unfuse_lora``,
        each one LoRA-loadable (diffusers' ``ValueError`` otherwise)."""
        if components is None:
            components = inspect.signature(getattr(type(self.pipe), verb)).parameters["components"].default
        if not components:
            raise ValueError("`components` cannot be an empty list.")
        loadable = self.pipe._lora_loadable_modules
        for name in components:
            if name not in loadable:
                raise ValueError(f"{name} is not found in self._lora_loadable_modules={loadable!r}.")
        return list(components)

    def first_capacities(self, adapters: Sequence[PipelineAdapter]) -> dict[str, Capacity]:
        """Per component: the LoRAs' layers plus its usual LoRA layers, at ``target_rank`` (diffusers' sizing)."""
        for adapter in adapters:
            if adapter.max_rank > self.target_rank:
                raise CapacityError(
                    f"{adapter.source}: rank {adapter.max_rank} is above target_rank={self.target_rank}; call "
                    f"enable_lora_hotswap(target_rank={adapter.max_rank}) or more before loading the first LoRA"
                )
        capacities = {}
        for name, module in lora_components(self.pipe).items():
            targets = self.target_modules.get(name) or (
                DEFAULT_TEXT_ENCODER_TARGETS if is_text_encoder(module) else DEFAULT_DENOISER_TARGETS
            )
            layers = usual_layers(module, Capacity(max_rank=self.target_rank, target_modules=targets))
            for adapter in adapters:
                if name in adapter.components:
                    layers |= adapter.components[name].target_names
            if layers:
                bias = any(a.components[name].has_bias for a in adapters if name in a.components)
                dora = any(a.components[name].has_dora for a in adapters if name in a.components)
                capacities[name] = Capacity(
                    max_rank=self.target_rank, target_modules=tuple(sorted(layers)), slots=self.names.slot_count,
                    max_blend=self.names.slot_count,
                    lora_bias=bias, dora=dora,
                )  # fmt: skip
        return capacities


def usual_layers(module: nn.Module, capacity: Capacity) -> set[str]:
    """The layers of ``module`` that ``capacity`` targets and loraswap can wrap, by full name."""
    module = getattr(module, "_orig_mod", module)
    return {n for n, m in module.named_modules() if n and capacity.matches(n) and slot_layer_class(m) is not None}


def enable_lora_hotswap(
    pipe_or_model: Any,
    target_rank: int = 128,
    *,
    adapters: Iterable[PipelineSource] | None = None,
    target_modules: Mapping[str, Sequence[str] | str] | None = None,
    slots: int = 1,
    cache_bytes: int | None = None,
    check_compiled: str = "error",
) -> PipelineHotswap | ModelHotswap:
    """Route a pipeline's (or a diffusers model's, see :func:`.model.enable_model_lora_hotswap`) LoRA methods
    to loraswap, for that instance only; call before loading the first LoRA and before compiling.

    Routed on the pipeline, with diffusers' signatures:

    - ``load_lora_weights(source, adapter_name=None, hotswap=False, **kwargs)`` -> loads every component's
      part into the slot of ``adapter_name`` and makes it the active adapter. ``hotswap=True`` replaces the
      named adapter (unnamed: the last one loaded), text encoders included; ``hotswap=False`` takes a free
      slot. ``kwargs`` (``weight_name``, ``subfolder``, ...) go to diffusers' ``lora_state_dict``.
    - ``set_adapters(names, adapter_weights=None)`` (blend, also after ``torch.compile``),
      ``delete_adapters(names)``, ``unload_lora_weights()``, ``disable_lora()`` / ``enable_lora()``,
      ``get_active_adapters()``, ``get_list_adapters()``, ``fuse_lora(components, lora_scale=1.0,
      adapter_names=None)`` / ``unfuse_lora(components)`` (the active adapters merged into those components'
      base weights with loraswap's fused mode where that is exact, else :class:`~loraswap.ModeError`: see
      :mod:`.fusing`; while fused, the verbs that change adapters raise until ``unfuse_lora`` or
      ``unload_lora_weights``, which keeps the fused weights as diffusers does).

    Capacity: ``adapters`` (the LoRAs to be served) gives each component the union of their targets,
    at once; otherwise the first load sizes it (its layers plus ``target_modules`` per component or the
    usual LoRA layers). ``slots``: how many adapters can be loaded at once. Lifted against diffusers:
    text encoders hot-swap, a LoRA may target layers the first did not, kohya per-module alphas load, a
    failed load leaves the loaded adapter in place, and a per-call scale compiles nothing. Kept: a rank
    above ``target_rank`` raises (``ValueError``), and ``check_compiled`` acts as in diffusers when an
    adapter is already loaded through diffusers/PEFT ("error": ``RuntimeError``; "warn"/"ignore": that
    adapter is taken over into slots).
    """
    unwrapped = getattr(pipe_or_model, "_orig_mod", pipe_or_model)
    if isinstance(unwrapped, nn.Module):
        return enable_model_lora_hotswap(unwrapped, target_rank, check_compiled, slots=slots)
    pipe = pipe_or_model
    components = {name: getattr(module, "_orig_mod", module) for name, module in lora_components(pipe).items()}
    taken_over = _take_over(components) if check_enable(components, check_compiled) else {}
    state = PipelineHotswap(pipe, target_rank, target_modules, slots, cache_bytes)
    if adapters is not None:
        capacities, read = capacities_for(pipe, adapters, slots=slots, min_rank=target_rank, max_blend=slots)
        state.attach(capacities)
        for source, adapter in read:
            key = source_cache_key(source, {})
            if key is not None:
                state.slots.cache.put(key, state.slots.pack(adapter))
    elif taken_over:
        state.attach(state.first_capacities(list(taken_over.values())))
    for name, adapter in taken_over.items():
        state.load(adapter, name, hotswap=False, hub_kwargs={})
    _route_lora_methods(pipe, state)
    return state


def _take_over(components: Mapping[str, nn.Module]) -> dict[str, PipelineAdapter]:
    """Adapters diffusers/PEFT already loaded into the components, by adapter name, out of the PEFT layers."""
    parts: dict[str, dict] = {}
    for component, module in components.items():
        for name, adapter in take_over_peft_adapters(module, component).items():
            parts.setdefault(name, {})[component] = adapter
    return {name: PipelineAdapter(by_component, f"<{name} loaded before enable_lora_hotswap>") for name, by_component in parts.items()}


def _route_lora_methods(pipe: Any, state: PipelineHotswap) -> None:
    names = state.names

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap=False, **kwargs):
        kwargs.pop("low_cpu_mem_usage", None)
        state.load(pretrained_model_name_or_path_or_dict, adapter_name, hotswap, kwargs)

    def get_list_adapters(self):
        listed: dict[str, list[str]] = {}
        for name in names.by_name:
            for component in state.components_of.get(name, []):
                listed.setdefault(component, []).append(name)
        return listed

    def fuse_lora(self, components=None, lora_scale=1.0, safe_fusing=False, adapter_names=None, **kwargs):
        state.fuse(components, lora_scale, adapter_names)

    def unfuse_lora(self, components=None, **kwargs):
        state.unfuse(components)

    methods = {
        "load_lora_weights": load_lora_weights,
        "set_adapters": lambda self, adapter_names, adapter_weights=None: names.set_adapters(adapter_names, adapter_weights),
        "delete_adapters": lambda self, adapter_names: names.delete(adapter_names),
        "unload_lora_weights": lambda self, *args, **kwargs: state.unload_all(),
        "disable_lora": lambda self: names.enable(False),
        "enable_lora": lambda self: names.enable(True),
        "get_active_adapters": lambda self: names.active(),
        "get_list_adapters": get_list_adapters,
        "fuse_lora": fuse_lora,
        "unfuse_lora": unfuse_lora,
    }
    for method_name, function in methods.items():
        object.__setattr__(pipe, method_name, types.MethodType(function, pipe))
    object.__setattr__(pipe, "loraswap_hotswap", state)
