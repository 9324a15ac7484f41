"""DoRA served exactly: PEFT's magnitude-over-norm, computed once per adapter and base weight.

At inference PEFT's DoRA layer (``tuners/lora/dora.py``) outputs
``base(x) + (g - 1) * base_no_bias(x) + g * s * B(A(x))`` with ``g = m / ||W + s*B*A||`` per output
feature (the norm over every other axis of the weight, detached), ``m`` the trained
``lora_magnitude_vector``, ``W`` the base weight and ``base_no_bias`` the base layer without its bias.
``g`` depends on the adapter, the base weight and ``s`` only, so it is computed here once, when the
adapter is packed (never per forward, never per swap from the host cache), and stored in the slot as
two fixed-shape pieces:

- ``lora_B`` multiplied by ``g`` row by row, so the slot's ordinary ``s * B(A(x))`` is PEFT's
  ``g * s * B(A(x))`` and several slots still sum in one matmul;
- ``dora = g - 1`` ``[out]``: the slot layer adds ``(sum_s w_s * dora_s) * (base(x) - b0)``.

A plain adapter's ``dora`` is 0, so its rows add ``delta + 0 * (...)``: bit for bit what they add without
DoRA. Strengths: ``g`` holds for the scaling ``s`` it was computed at. PEFT recomputes the norm when the
scaling changes (``rescale_adapter_scale``, ``set_scale``), so a DoRA slot read at a weight other than 0 or 1
would need another ``g``; :class:`~loraswap.swap.AdapterSlots` refuses it by name
(:class:`~loraswap.errors.DoraStrengthError`) instead of serving the strength-1 norm.

The weight's rows are its output features: ``weight.reshape(out, -1)`` for Linear and ConvNd, the transpose
for transformers' Conv1D (stored ``[in, out]``) and Embedding (``[num_embeddings, dim]``), as PEFT's
``fan_in_fan_out`` and ``DoraEmbeddingLayer`` read them. Half-precision weights are computed in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .adapter import Adapter, LayerLora
from .errors import NonFiniteError, UnsupportedAdapterError


def weight_rows(weight: torch.Tensor, major_in: bool) -> torch.Tensor:
    """The base weight as ``[out, -1]``: one row per output feature (``major_in``: stored ``[in, out]``)."""
    return weight.t() if major_in else weight.reshape(weight.shape[0], -1)


def lora_delta(layer: LayerLora, dtype: torch.dtype) -> torch.Tensor:
    """``B @ A`` as ``[out, -1]`` (rows = output features), without the scaling."""
    rank = layer.rank
    return layer.lora_B.reshape(layer.lora_B.shape[0], rank).to(dtype) @ layer.lora_A.reshape(rank, -1).to(dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def magnitude_over_norm(
    name: str, weight: torch.Tensor, layer: LayerLora, scaling: float, major_in: bool
) -> torch.Tensor:
    """``g = m / ||W + scaling * B*A||`` per output feature (``[out]``, the weight's compute dtype), checked finite."""
    dtype = compute_dtype(weight.dtype)
    rows = weight_rows(weight.detach(), major_in).to(dtype)
    norm = torch.linalg.norm(rows + scaling * lora_delta(layer, dtype).to(rows.device), dim=1)
    gain = layer.magnitude.reshape(-1).to(rows.device, dtype) / norm
    if not bool(torch.isfinite(gain).all()):
        raise NonFiniteError(
            f"layer {name!r}: DoRA's magnitude over the norm of W + s*B*A is not finite (a zero row norm or a "
            "non-finite magnitude); the adapter does not belong to this base model, or is corrupt"
        )
    return gain


def resolve_dora(
    adapter: Adapter,
    base_weight: Callable[[str], torch.Tensor],
    major_in: Callable[[str], bool],
) -> Adapter:
    """``adapter`` with every DoRA layer ready for a slot: ``lora_B`` times ``g``, ``dora = g - 1``, no magnitude.

    ``adapter`` must be validated against the layout first (shapes, room for DoRA, finite values);
    ``base_weight(name)`` is the layer's (unmerged) base weight, ``major_in(name)`` whether it is stored
    ``[in, out]``. Returns ``adapter`` itself when it has no DoRA layer. Builds new host tensors only.
    """
    if not any(layer.magnitude is not None for layer in adapter.layers.values()):
        return adapter
    layers = dict(adapter.layers)
    for name, layer in adapter.layers.items():
        if layer.magnitude is None:
            continue
        weight = base_weight(name)
        if type(weight).__name__ == "DTensor":
            raise UnsupportedAdapterError(
                f"layer {name!r}: {adapter.source} is DoRA, whose norm spans the whole weight row, and this layer is "
                "sharded (tensor parallel); serve DoRA adapters on an unsharded model"
            )
        gain = magnitude_over_norm(name, weight, layer, layer.scaling, major_in(name)).cpu()
        rank = layer.rank
        lora_B = layer.lora_B.reshape(layer.lora_B.shape[0], rank).to(gain.dtype) * gain[:, None]
        layers[name] = dataclasses.replace(
            layer,
            lora_B=lora_B.to(layer.lora_B.dtype).reshape(layer.lora_B.shape),
            magnitude=None,
            dora=(gain - 1).to(layer.lora_B.dtype),
        )
    return dataclasses.replace(adapter, layers=layers)
