"""``attach``: wrap a model's target layers with fixed-shape slot layers, in place, before compiling."""

from __future__ import annotations

import sys
from typing import Literal

from torch import nn

from .cache import AdapterCache, default_cache_bytes
from .capacity import Capacity
from .compile_guard import note_replaced_layer_types
from .errors import AttachOrderError, CapacityError, HotswapError, ModeError
from .fused import FusedSlots, attach_fused, is_fused
from .layers import SlotLayer, slot_layer_class
from .layout import SlotLayout
from .routing import Router
from .swap import AdapterSlots


def find_targets(model: nn.Module, capacity: Capacity) -> list[tuple[str, nn.Module, type[SlotLayer]]]:
    """Every module whose name ``capacity`` targets, with the slot layer class that wraps it."""
    targets = []
    for name, module in model.named_modules():
        if not name or not capacity.matches(name):
            continue
        layer_class = slot_layer_class(module)
        if layer_class is None:
            raise CapacityError(
                f"layer {name!r} matches Capacity.target_modules but is a {type(module).__name__}; loraswap wraps "
                "Linear, Conv1d/2d/3d, Embedding and transformers' Conv1D: narrow target_modules"
            )
        targets.append((name, module, layer_class))
    if not targets:
        raise CapacityError(
            f"no layer of the model matches Capacity.target_modules={capacity.target_modules!r}; "
            "give layer names as PEFT does (name suffixes such as 'q_proj', or one regex)"
        )
    return targets


def _tensor_parallel():
    """:mod:`loraswap.tensor_parallel`, or None when DTensor was never imported: then no parameter can be a DTensor,
    and ``import loraswap`` need not import ``torch.distributed.tensor`` (seconds on a busy machine)."""
    if "torch.distributed.tensor" not in sys.modules:
        return None
    from . import tensor_parallel

    return tensor_parallel


def _is_compiled_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile``'s wrapper; without dynamo imported, nothing can be one."""
    if "torch._dynamo" not in sys.modules:
        return False
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(model, OptimizedModule)


def attach(
    model: nn.Module,
    capacity: Capacity,
    *,
    mode: Literal["slots", "fused"] = "slots",
    cache_bytes: int | None = None,
    check_rows: bool = False,
) -> AdapterSlots | FusedSlots:
    """Give every target layer ``capacity.slots`` LoRA slots, in place; slot 0 is active and empty.

    ``mode="fused"`` leaves the layers as they are and merges the active adapter into their weights
    (no per-step cost; no ``route``/``blend``): see :mod:`loraswap.fused`.

    Call it after the model is on its device and dtype and before ``torch.compile``.
    ``cache_bytes`` bounds the host adapter cache (default: a quarter of RAM, at most 16 GiB; 0 disables it).
    ``check_rows=True`` makes every forward whose batch has another row count than the last ``route``/``blend``
    list gave raise :class:`~loraswap.SlotError` (see :meth:`AdapterSlots.route`); off, it costs nothing.
    """
    if mode not in ("slots", "fused"):
        raise ModeError(f"attach mode {mode!r} is not available; use mode='slots' or mode='fused'")
    if _is_compiled_wrapper(model):
        raise AttachOrderError(
            "attach was given a torch.compile'd model (OptimizedModule); attach to the model first, then compile it: "
            "slots = loraswap.attach(model, capacity); compiled = torch.compile(model)"
        )
    if check_rows and mode == "fused":
        raise ModeError(
            "check_rows=True checks the rows given to route()/blend(), which fused mode does not have; "
            "attach with mode='slots' to route rows"
        )
    if is_fused(model) or any(isinstance(module, SlotLayer) for module in model.modules()):
        raise HotswapError("the model already has loraswap slots; attach once per model")
    cache = AdapterCache(default_cache_bytes() if cache_bytes is None else cache_bytes)
    tensor_parallel = _tensor_parallel()
    if mode == "fused":
        if tensor_parallel is not None:
            tensor_parallel.refuse_sharded(model, "mode='fused'")
        return attach_fused(model, capacity, cache)
    targets = find_targets(model, capacity)
    # empty unless target weights are DTensors (tensor parallel)
    shards = tensor_parallel.ShardPlan.detect(targets) if tensor_parallel is not None else None
    capacity.check_layer_ranks(name for name, _, _ in targets)
    if shards and capacity.dora:
        raise CapacityError(
            "Capacity(dora=True) on a tensor-parallel model: DoRA's norm spans whole weight rows, which the shards "
            "split; serve DoRA adapters on an unsharded model, or attach without DoRA"
        )
    devices = {module.weight.device for _, module, _ in targets}
    if len(devices) > 1:
        raise CapacityError(
            f"the target layers span devices {sorted(map(str, devices))}; attach supports one device per model"
        )
    specs = {name: shards.spec(name, cls.spec(module)) if shards else cls.spec(module) for name, module, cls in targets}
    layout = SlotLayout.plan(((name, module, specs[name]) for name, module, _ in targets), capacity)
    storage = layout.allocate(capacity.slots)
    router = Router(capacity.slots, capacity.max_batch, devices.pop(), capacity.max_blend)
    note_replaced_layer_types(type(module) for _, module, _ in targets)
    for name, module, layer_class in targets:
        place = layout.placements[name]
        group = place.group
        buffers = layout.views(storage.weights[group], storage.scales[group], storage.live[group], name)
        if shards:
            layer_class = shards.layer_class(name, layer_class)
        dora = layout.dora_view(storage.weights[group], name)
        extra = {} if dora is None else {"lora_dora": dora}  # tensor-parallel layers never take one (refused above)
        slot_layer = layer_class(module, *buffers, router, **extra)
        model.set_submodule(name, slot_layer)
    if shards:
        return tensor_parallel.TensorParallelSlots(
            model, capacity, layout, storage, router, cache, shards=shards, check_rows=check_rows
        )
    return AdapterSlots(model, capacity, layout, storage, router, cache, check_rows=check_rows)
