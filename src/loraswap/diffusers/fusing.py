"""``fuse_lora`` / ``unfuse_lora`` for the drop-ins: the adapters a model runs, merged into its base weights.

The drop-ins attach in slots mode (slot layers around the base layers). ``fuse_lora`` turns the adapters
active at that moment (with their ``set_adapters`` weights, times ``lora_scale``) into one :class:`Adapter`
over the slot layers' *base* layers (the slots' ranks side by side, each slot's weight and scale folded into
its ``lora_B``: exactly the sum the slot layers compute; a DoRA slot is refused by name), and merges it with loraswap's fused mode
(:class:`~loraswap.FusedSlots`): ``W0 + B @ A`` written into each base weight's own storage, from a pristine
host copy taken at that moment. The model's routing is then emptied, so the slot layers add nothing and a
forward costs the base model's plus the (zero-weight) slot kernels; ``unfuse_lora`` restores every base
weight bit for bit from the pristine copy and writes the routing back. Nothing changes a shape or a Python
attribute, so a compiled model does not recompile.

Where a merge is not exact, ``fuse_lora`` raises :class:`~loraswap.ModeError` before writing anything: a
quantized base weight (the merge would be re-quantized), a grouped, dilated or non-zero-padded conv (the
LoRA's conv has no groups or dilation), an embedding scaled by ``embed_scale`` (the scale applies to the
LoRA's output, not to a merged table), a LoRA bias on a layer without a bias (nothing to merge it into).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..adapter import Adapter, LayerLora
from ..cache import AdapterCache
from ..capacity import Capacity
from ..errors import HotswapError, ModeError
from ..fused import FusedSlots, attach_fused
from ..layers import SlotLayer


def merged_adapter(model: nn.Module, weights: Mapping[int, float], source: str) -> Adapter:
    """The slots in ``weights`` (slot -> weight) as one adapter over ``model``'s base layers: ranks concatenated,
    ``weight * scale`` folded into ``lora_B``, scaling 1; layers whose slots are all empty are left out."""
    layers = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, SlotLayer):
            continue
        terms = [(slot, weight * float(layer.scale[slot])) for slot, weight in weights.items()]
        terms = [(slot, factor) for slot, factor in terms if factor != 0.0]
        if not terms:
            continue
        if layer.lora_dora is not None and any(bool(layer.lora_dora[slot].any()) for slot, _ in terms):
            raise ModeError(
                f"layer {name!r}: fuse_lora of a DoRA adapter is not implemented in the drop-in (its magnitude rescales "
                "the merged weight, which one B @ A cannot hold); keep it unfused (slots mode serves it exactly), or "
                "serve it with loraswap.attach(..., mode='fused')"
            )
        if isinstance(getattr(layer.base_layer, "embed_scale", None), torch.Tensor):
            raise ModeError(
                f"layer {name!r}: fuse_lora cannot merge into an embedding scaled by embed_scale (the scale applies to "
                "the LoRA's output, not to a merged table); keep the LoRA unfused, slots mode applies it exactly"
            )
        trailing = (1,) * layer.spec(layer.base_layer).b_trailing
        lora_A = torch.cat([layer.lora_A[slot] for slot, _ in terms])
        lora_B = torch.cat([layer.lora_B[slot] * factor for slot, factor in terms], dim=1)
        bias = None
        if layer.lora_bias is not None:
            bias = sum(layer.lora_bias[slot] * factor for slot, factor in terms)
        layers[f"{name}.base_layer"] = LayerLora(lora_A, lora_B.reshape(*lora_B.shape, *trailing), 1.0, bias)
    return Adapter(layers, source)


def fuse_into_base(model: nn.Module, weights: Mapping[int, float], label: str) -> FusedSlots | None:
    """Merge the slots in ``weights`` into ``model``'s base weights; the returned handle's ``unload(0)`` unfuses.
    None when no slot in ``weights`` holds anything for this model (nothing to fuse). Validated in full first."""
    adapter = merged_adapter(model, weights, f"<fuse_lora {label}>")
    if not adapter.layers:
        return None
    capacity = Capacity(max_rank=adapter.max_rank, target_modules=tuple(sorted(adapter.layers)), lora_bias=adapter.has_bias)
    try:
        fused = attach_fused(model, capacity, AdapterCache(0))
        packed = fused.pack(adapter)
    except HotswapError as err:
        raise ModeError(
            f"{label}: fuse_lora cannot merge this LoRA into the base weights exactly ({err}); keep it unfused: "
            "slots mode applies it exactly, at the cost of the LoRA kernels per step"
        ) from err
    fused.load_packed(packed, 0)
    return fused

