"""The model-level drop-in: ``model.enable_lora_hotswap`` + ``model.load_lora_adapter(..., hotswap=True)``
on a diffusers ``ModelMixin`` (UNet2DConditionModel, Flux/Flux2/QwenImage/Chroma/SD3/Wan transformers).

:func:`enable_model_lora_hotswap` gives the model *instance* loraswap-backed LoRA methods with
diffusers' signatures (the class and other instances are untouched). As in diffusers, the capacity is
sized at the first load: the layers that LoRA targets plus the usual LoRA layers of the model
(:data:`DEFAULT_DENOISER_TARGETS`), each padded to ``target_rank``; compile after that first load.
Later loads may target any of those layers (diffusers: only a subset of the first LoRA's), and every
verb is a copy into fixed tensors, so a compiled model never recompiles.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter
from ..attach import attach as attach_model
from ..capacity import Capacity
from ..errors import CapacityError, ModeError
from ..fused import FusedSlots
from ..layers import slot_layer_class
from ..swap import AdapterSlots
from .fusing import fuse_into_base
from .naming import NamedAdapters, check_enable, in_target_rank_words, take_over_peft_adapters
from .prompts import SCALE_KWARGS, split_scale
from .reading import component_adapter

# Layers that diffusers and kohya trainers put LoRAs on (PEFT meaning: name suffixes).
DEFAULT_DENOISER_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_in", "proj_out", "proj_mlp", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip


class ModelHotswap:
    """loraswap behind one diffusers model's LoRA methods; ``slots`` is None until the first load."""

    def __init__(self, model: nn.Module, target_rank: int, slot_count: int, taken_over: Mapping[str, Adapter]) -> None:
        self.model = model
        self.target_rank = target_rank
        self.names = NamedAdapters(slot_count)
        self.slots: AdapterSlots | None = None
        self.fused: FusedSlots | None = None  # what fuse_lora merged; unload(0) unfuses
        for name, adapter in taken_over.items():
            self.load(adapter, adapter_name=name, hotswap=False)

    def load(self, adapter: Adapter, adapter_name: str | None, hotswap: bool) -> None:
        name, slot = self.names.slot_for_load(adapter_name, hotswap)
        if self.slots is None:
            self.slots = attach_model(self.model, first_capacity(self.model, adapter, self.target_rank, self.names.slot_count))
            self.names.target = self.slots
        with in_target_rank_words(self.target_rank):
            self.slots.load(adapter, slot)
        self.names.loaded(name, slot, hotswap)

    def fuse(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        """diffusers' ``fuse_lora``: the active adapters (or ``adapter_names``) merged into the base weights (see
        :mod:`.fusing`); the routing is emptied so that nothing is added twice."""
        weights = self.names.fused_weights(adapter_names, lora_scale)
        label = type(self.model).__name__
        fused = None if self.slots is None else fuse_into_base(self.model, weights, label)
        if fused is None:
            raise ModeError(f"{label}: fuse_lora found no loaded adapter among {sorted(weights) or 'the active ones'} to fuse")
        self.fused = fused
        self.names.fused = True
        self.slots.blend({})

    def unfuse(self) -> None:
        """diffusers' ``unfuse_lora``: every base weight back bit for bit, the routing written back."""
        if self.fused is None:
            raise ModeError(f"{type(self.model).__name__}: unfuse_lora called, but nothing is fused (call fuse_lora first)")
        self.fused.unload(0)
        self.fused = None
        self.names.fused = False
        self.names.write()

    def unload_all(self) -> None:
        """diffusers' ``unload_lora``: every adapter dropped; weights that ``fuse_lora`` merged stay merged."""
        self.fused = None
        self.names.unload_all()


def first_capacity(model: nn.Module, adapter: Adapter, target_rank: int, slot_count: int) -> Capacity:
    """The first LoRA's layers plus the model's usual LoRA layers, at ``target_rank`` (diffusers' sizing)."""
    if adapter.max_rank > target_rank:
        raise CapacityError(
            f"{adapter.source}: rank {adapter.max_rank} is above target_rank={target_rank}; call "
            f"enable_lora_hotswap(target_rank={adapter.max_rank}) or more before loading the first adapter"
        )
    defaults = Capacity(max_rank=target_rank, target_modules=DEFAULT_DENOISER_TARGETS)
    usual = {n for n, m in model.named_modules() if n and defaults.matches(n) and slot_layer_class(m) is not None}
    targets = tuple(sorted(usual | set(adapter.target_names)))
    return Capacity(
        max_rank=target_rank, target_modules=targets, slots=slot_count, max_blend=slot_count, lora_bias=adapter.has_bias,
        dora=adapter.has_dora,
    )  # set_adapters may weight every loaded adapter in one row


def read_model_adapter(
    model: nn.Module, source: Any, prefix: str | None, kwargs: dict[str, Any]
) -> Adapter | None:
    """``source`` read as ``model.load_lora_adapter`` reads it (diffusers' ``_fetch_state_dict``, the
    ``prefix`` filter, diffusers' key converter, the header's LoraConfig or ``network_alphas``);
    None when no key carries the prefix (diffusers then loads nothing). Options diffusers ignores
    (``safe_serialization``, ...) are ignored here too."""
    from diffusers.loaders.lora_base import _fetch_state_dict

    network_alphas = kwargs.pop("network_alphas", None)
    options = {key: kwargs.pop(key, None) for key in (
        "weight_name", "use_safetensors", "local_files_only", "cache_dir", "force_download", "proxies", "token",
        "revision", "subfolder", "metadata",
    )}  # fmt: skip
    kwargs.pop("low_cpu_mem_usage", None)
    kwargs.pop("_pipeline", None)
    state_dict, metadata = _fetch_state_dict(
        pretrained_model_name_or_path_or_dict=source,
        user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
        allow_pickle=False,
        **options,
    )
    if network_alphas is not None and prefix is None:
        raise ValueError("`network_alphas` cannot be None when `prefix` is None.")
    if network_alphas and metadata:
        raise ValueError("Both `network_alphas` and `metadata` cannot be specified.")
    if prefix is not None:
        state_dict = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        metadata = {k.removeprefix(f"{prefix}."): v for k, v in (metadata or {}).items() if k.startswith(f"{prefix}.")}
        network_alphas = {
            k.removeprefix(f"{prefix}."): float(v) for k, v in (network_alphas or {}).items() if k.startswith(f"{prefix}.")
        }
    if not state_dict:
        return None
    label = source if isinstance(source, str) else "<state dict>"
    return component_adapter(state_dict, network_alphas or {}, metadata or None, model, str(label))


def enable_model_lora_hotswap(
    model: nn.Module, target_rank: int = 128, check_compiled: str = "error", *, slots: int = 1
) -> ModelHotswap:
    """Route ``model``'s LoRA methods to loraswap (this instance only); call before loading the first LoRA.

    Routed, with diffusers' signatures: ``load_lora_adapter(source, prefix="transformer", hotswap=False,
    adapter_name=..., **kwargs)``, ``set_adapters(names, weights=None)``, ``set_adapter(name)``,
    ``delete_adapters(names)``, ``unload_lora()``, ``disable_lora()`` / ``enable_lora()``,
    ``active_adapters()``, ``fuse_lora(lora_scale=1.0, adapter_names=None)`` / ``unfuse_lora()`` (the active
    adapters merged into the base weights with loraswap's fused mode where that is exact, else
    :class:`~loraswap.ModeError`: see :mod:`.fusing`). ``slots``: how many adapters can be loaded at
    once (for ``set_adapters`` over several). The strength a forward receives the diffusers way
    (``model(..., cross_attention_kwargs={"scale": s})``, ``joint_attention_kwargs``, ``attention_kwargs``) is a
    routing weight: changing it between calls compiles nothing. An adapter already loaded through diffusers/PEFT is
    taken over into slots when ``check_compiled`` allows it ("warn" logs diffusers' warning first).
    """
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    taken_over = (
        take_over_peft_adapters(model, type(model).__name__) if check_enable({"model": model}, check_compiled) else {}
    )
    state = ModelHotswap(model, target_rank, slots, taken_over)
    names = state.names

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False, **kwargs):
        adapter_name = kwargs.pop("adapter_name", None)
        adapter = read_model_adapter(self, pretrained_model_name_or_path_or_dict, prefix, kwargs)
        if adapter is not None:
            state.load(adapter, adapter_name, hotswap)

    methods = {
        "load_lora_adapter": load_lora_adapter,
        "set_adapters": lambda self, adapter_names, weights=None: names.set_adapters(adapter_names, weights),
        "set_adapter": lambda self, adapter_name: names.set_adapters(adapter_name),
        "delete_adapters": lambda self, adapter_names: names.delete(adapter_names),
        "unload_lora": lambda self: state.unload_all(),
        "disable_lora": lambda self: names.enable(False),
        "enable_lora": lambda self: names.enable(True),
        "active_adapters": lambda self: names.active(),
        "fuse_lora": lambda self, lora_scale=1.0, safe_fusing=False, adapter_names=None: state.fuse(lora_scale, adapter_names),
        "unfuse_lora": lambda self: state.unfuse(),
    }
    for method_name, function in methods.items():
        object.__setattr__(model, method_name, types.MethodType(function, model))
    object.__setattr__(model, "loraswap_hotswap", state)
    _route_call_scale(model, names)
    return state


def _route_call_scale(model: nn.Module, names: NamedAdapters) -> None:
    """Make the ``scale`` a forward receives the diffusers way (``cross_attention_kwargs`` / ``joint_attention_kwargs``
    / ``attention_kwargs``, whichever the model's forward takes) a routing weight: a forward pre-hook takes it out of
    the kwargs and scales the routing before the (compiled) forward runs. The hook runs outside dynamo, so the
    scale is never a Python float that a compiled graph guards on: changing it compiles nothing."""
    parameters = inspect.signature(model.forward).parameters
    kwarg = next((name for name in SCALE_KWARGS if name in parameters), None)
    if kwarg is None:
        return

    @torch._dynamo.disable
    def take_scale(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        scale, options = split_scale(kwargs.get(kwarg))
        names.scale_call(scale)
        rest = {key: value for key, value in kwargs.items() if key != kwarg}
        return args, rest if options is None else {**rest, kwarg: options}  # as a call that never passed it

    model.register_forward_pre_hook(take_scale, with_kwargs=True)
