"""The value checks a load runs before anything is copied: finite values that fit the model's dtype, room for
DoRA vectors, and base weights an embedding LoRA was saved with.

Each raises a :class:`~loraswap.errors.HotswapError` naming the layer, the value and the fix; none writes
anything, so a refused load leaves the model as it was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import torch

from .adapter import Adapter, LayerLora
from .errors import CapacityError, NonFiniteError, UnsupportedAdapterError
from .layers import SlotSpec


def check_saved_base_weights(adapter: Adapter, base_weight: Callable[[str], torch.Tensor], targets) -> None:
    """Raise :class:`UnsupportedAdapterError` when a base weight PEFT saved beside an embedding (or lm_head)
    LoRA differs from the model's: the vocabulary was resized, and a hot-swap cannot change base weights.

    ``base_weight(name)`` is the model's weight of a targeted layer (before any merge); ``targets`` the
    layer names it knows. Runs before the shape checks, so a resized vocabulary is named as such.
    """
    for name, saved in adapter.base_weights.items():
        if name not in targets:
            continue
        weight = base_weight(name).detach()
        rows = f"{saved.shape[0]} rows" if saved.dim() else "a scalar"
        if saved.shape != weight.shape:
            differs = (
                f"the adapter was saved with a base weight of {rows} {list(saved.shape)}, "
                f"the model's has {weight.shape[0]} rows {list(weight.shape)}"
            )
        else:
            changed = (saved.to(weight.device, weight.dtype) != weight).reshape(weight.shape[0], -1).any(dim=1)
            if not changed.any():
                continue
            first = int(changed.nonzero()[0])
            differs = (
                f"{int(changed.sum())} of its {weight.shape[0]} rows differ from the model's (the first is row {first})"
            )
        raise UnsupportedAdapterError(
            f"layer {name!r}: {adapter.source} is an embedding LoRA saved with a resized vocabulary or a changed base "
            f"embedding: {differs}. A hot-swap cannot change the base model's weights; serve the base model the "
            "adapter was trained on (load the adapter's saved base_layer weight into it before attach), or retrain"
        )


def check_dora_room(name: str, spec: SlotSpec, has_dora: bool) -> None:
    """Raise when a DoRA layer cannot be served: no room for DoRA vectors, or a grouped conv."""
    if spec.groups > 1:
        raise UnsupportedAdapterError(
            f"layer {name!r}: DoRA on a conv with groups={spec.groups} cannot be served exactly: PEFT's DoRA norm "
            "treats the grouped weight as dense, and its own conv DoRA is wrong there; retrain with use_dora=False "
            "for that layer, or leave it out of the adapter"
        )
    if not has_dora:
        raise CapacityError(
            f"layer {name!r}: the adapter is DoRA (a magnitude vector per output feature) but the capacity has no "
            "room for DoRA vectors; attach with Capacity(..., dora=True), or build the capacity with "
            "Capacity.for_adapters over every adapter you will serve (it turns DoRA on when one needs it)"
        )


def check_values(layers: Iterable[tuple[str, LayerLora, torch.dtype | None]]) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor with a NaN or inf, or a value beyond its layer's
    dtype (None: finite is enough). A norm within the dtype's range bounds every value, so one float32
    norm per tensor answers the common case; only a failure looks at elements."""
    named = [
        (name, role, tensor, dtype)
        for name, layer, dtype in layers
        for role, tensor in (
            ("lora_A", layer.lora_A),
            ("lora_B", layer.lora_B),
            ("lora_bias", layer.lora_bias),
            ("lora_magnitude_vector", layer.magnitude),
            ("dora", layer.dora),
        )
        if tensor is not None and tensor.numel()
    ]
    limits = [_float_max(dtype or torch.float32) for *_, dtype in named]
    if _norms_within([tensor for _, _, tensor, _ in named], limits):
        return
    for (name, role, tensor, dtype), limit in zip(named, limits):
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())
        if bad:
            raise NonFiniteError(
                f"layer {name!r}: {role} holds {bad} NaN or infinite value(s); the adapter is corrupt, re-export it"
            )
        largest = float(tensor.abs().max())
        if dtype is not None and largest > limit:
            raise NonFiniteError(
                f"layer {name!r}: {role} holds {largest:.3g}, beyond what the model's dtype holds ({limit:.3g}): "
                "it would load as infinite; attach the model in a wider dtype or rescale the adapter"
            )


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value is finite; element-wise only when a norm is not (a huge finite tensor can overflow it)."""
    tensors = [tensor for tensor in tensors if tensor.numel()]
    return _norms_within(tensors, [_float_max(torch.float32)] * len(tensors)) or all(
        bool(torch.isfinite(tensor).all()) for tensor in tensors
    )


@functools.cache
def _float_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def _norms_within(tensors: Sequence[torch.Tensor], limits: Sequence[float]) -> bool:
    """Whether each tensor's float32 norm is at most its limit (NaN and inf propagate through a norm, so they fail).

    One ``_foreach_norm``: ``torch.isfinite(t).all()`` and ``_foreach_norm(ord=inf)`` are 50-100x slower on CPU."""
    if not tensors:
        return True
    norms = torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32))
    return bool((norms <= torch.tensor(limits)).all())
