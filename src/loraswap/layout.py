"""Where every slot layer's tensors live, and how an adapter is packed into that layout.

All slot buffers of one dtype share one flat tensor ``weights[slots, numel]``: slot ``s`` of every
layer is a view at a fixed offset into row ``s``. Scalings live in ``scales[slots, layers]``
(float32, so bf16 models keep exact alpha/r). An adapter packed into the same layout
(:class:`PackedAdapter`) is what the host cache keeps, and a swap is one copy per row.

:meth:`SlotLayout.pack` validates everything (targets, ranks, shapes, dtypes, finite values)
before it builds anything, and builds only fresh host tensors: the model is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapter import Adapter, LayerLora
from .capacity import Capacity
from .errors import (
    CapacityError,
    NonFiniteError,
    RankOverCapacityError,
    ShapeMismatchError,
    SlotError,
    UnsupportedAdapterError,
)
from .layers import SlotSpec

if TYPE_CHECKING:
    from .fused import FusedAdapter

ALIGN_BYTES = 64


@dataclass(frozen=True)
class LayerPlacement:
    """One layer's rank and offsets inside its group's flat slot row."""

    name: str
    spec: SlotSpec
    rank: int
    group: int
    scale_index: int
    a_offset: int
    b_offset: int
    bias_offset: int | None

    @property
    def a_shape(self) -> tuple[int, ...]:
        return (self.rank, *self.spec.a_tail)

    @property
    def b_shape(self) -> tuple[int, int]:
        return (self.spec.out, self.rank)


@dataclass(frozen=True)
class Group:
    """Layers that share a dtype and device, and so one flat buffer."""

    dtype: torch.dtype
    device: torch.device
    numel: int
    layers: int


@dataclass(frozen=True)
class SlotStorage:
    """The device tensors every slot layer's buffers are views of."""

    weights: tuple[torch.Tensor, ...]  # per group: [slots, numel]
    scales: tuple[torch.Tensor, ...]  # per group: [slots, layers], float32


@dataclass(frozen=True)
class PackedAdapter:
    """An adapter laid out exactly as one slot row: what the cache keeps and a swap copies."""

    weights: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor, ...]
    source: str
    targets: frozenset[str]
    layout: SlotLayout = field(repr=False, compare=False)  # the layout it was packed for: only that one can take it

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.weights, *self.scales))


def check_packed_for(packed: PackedAdapter | FusedAdapter, layout: SlotLayout) -> None:
    """Refuse an adapter that was packed for another model's slots (its bytes would land in the wrong places)."""
    if packed.layout is not layout:
        raise SlotError(
            f"{packed.source} was packed for another attached model; pack it with this model's slots "
            "(slots.pack(adapter) or slots.packed(source)) before load_packed"
        )


class SlotLayout:
    """The fixed placement of every slot layer's LoRA tensors, decided once at ``attach``."""

    def __init__(self, placements: dict[str, LayerPlacement], groups: list[Group], has_bias: bool) -> None:
        self.placements = placements
        self.groups = groups
        self.has_bias = has_bias

    @classmethod
    def plan(cls, targets: Iterable[tuple[str, nn.Module, SlotSpec]], capacity: Capacity) -> SlotLayout:
        placements: dict[str, LayerPlacement] = {}
        group_keys: list[tuple[torch.dtype, torch.device]] = []
        numel: list[int] = []
        layers: list[int] = []
        for name, module, spec in targets:
            key = (module.weight.dtype, module.weight.device)
            if key not in group_keys:
                group_keys.append(key)
                numel.append(0)
                layers.append(0)
            group = group_keys.index(key)
            align = max(ALIGN_BYTES // module.weight.element_size(), 1)
            rank = capacity.rank_for(name)
            if rank % spec.groups:
                raise CapacityError(
                    f"layer {name!r} is a conv with groups={spec.groups}; its capacity rank {rank} must be a "
                    f"multiple of {spec.groups}: set Capacity.max_rank (or layer_ranks) accordingly"
                )
            offsets = []
            for size in (rank * math.prod(spec.a_tail), spec.out * rank, spec.out if capacity.lora_bias else 0):
                offsets.append(numel[group] if size else None)
                numel[group] += -(-size // align) * align
            placements[name] = LayerPlacement(
                name, spec, rank, group, layers[group], offsets[0], offsets[1], offsets[2]
            )
            layers[group] += 1
        groups = [Group(dtype, device, n, count) for (dtype, device), n, count in zip(group_keys, numel, layers)]
        return cls(placements, groups, capacity.lora_bias)

    @property
    def slot_nbytes(self) -> int:
        """Bytes one slot (or one cached adapter) takes."""
        return sum(g.numel * g.dtype.itemsize + g.layers * 4 for g in self.groups)

    def allocate(self, slots: int) -> SlotStorage:
        return SlotStorage(
            weights=tuple(torch.zeros(slots, g.numel, dtype=g.dtype, device=g.device) for g in self.groups),
            scales=tuple(torch.zeros(slots, g.layers, dtype=torch.float32, device=g.device) for g in self.groups),
        )

    def views(self, weights: torch.Tensor, scales: torch.Tensor, name: str):
        """``(lora_A, lora_B, scale, lora_bias)`` of one layer inside ``weights [..., numel]`` and ``scales [..., layers]``."""
        place = self.placements[name]
        lead = weights.shape[:-1]

        def window(offset: int, shape: tuple[int, ...]) -> torch.Tensor:
            return weights[..., offset : offset + math.prod(shape)].view(*lead, *shape)

        bias = None if place.bias_offset is None else window(place.bias_offset, (place.spec.out,))
        return (
            window(place.a_offset, place.a_shape),
            window(place.b_offset, place.b_shape),
            scales[..., place.scale_index],
            bias,
        )

    def validate(self, adapter: Adapter, *, cast: bool = False) -> None:
        """Raise the first reason ``adapter`` cannot be loaded into a slot; touches nothing.

        ``cast=True`` also refuses a value that the slot's dtype cannot hold (an fp32 adapter
        value beyond an fp16 model's range would become inf in the slot).
        """
        for name, layer in adapter.layers.items():
            place = self.placements.get(name)
            if place is None:
                raise CapacityError(
                    f"layer {name!r}: {adapter.source} targets it but attach() did not give it slots; "
                    "add it to Capacity.target_modules, or build the capacity with Capacity.for_adapters "
                    "over every adapter you will serve"
                )
            _validate_layer(name, layer, place, self.has_bias)
        _check_values(
            (name, layer, self.groups[self.placements[name].group].dtype if cast else None)
            for name, layer in adapter.layers.items()
        )

    def fill(self, adapter: Adapter, weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor]) -> None:
        """Write a validated ``adapter`` into one slot row (``weights``/``scales``: one tensor per group).

        The row is zeroed, then every tensor is copied once, straight into its padded place: one
        ``_foreach_copy_``, from the file's memory map when the adapter was read mapped.
        """
        torch._foreach_zero_([*weights, *scales])
        scale_values = [[0.0] * g.layers for g in self.groups]
        destinations: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for name, layer in adapter.layers.items():
            place = self.placements[name]
            lora_A, lora_B, _, bias = self.views(weights[place.group], scales[place.group], name)
            for destination, source in _padded_pairs(layer, place.spec, lora_A, lora_B):
                destinations.append(destination)
                sources.append(source)
            if layer.lora_bias is not None:
                destinations.append(bias)
                sources.append(layer.lora_bias)
            scale_values[place.group][place.scale_index] = layer.scaling
        torch._foreach_copy_(destinations, sources)
        for scale, values in zip(scales, scale_values):
            scale.copy_(torch.tensor(values, dtype=torch.float32))

    def pack(self, adapter: Adapter, pin_memory: bool = False) -> PackedAdapter:
        """Validate ``adapter``, then lay it out as one slot row on the host (one pass, see :meth:`fill`)."""
        self.validate(adapter, cast=True)
        weights = tuple(torch.empty(g.numel, dtype=g.dtype, pin_memory=pin_memory) for g in self.groups)
        scales = tuple(torch.empty(g.layers, dtype=torch.float32, pin_memory=pin_memory) for g in self.groups)
        self.fill(adapter, weights, scales)
        return PackedAdapter(weights, scales, adapter.source, adapter.target_names, self)


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


def _validate_layer(name: str, layer: LayerLora, place: LayerPlacement, has_bias: bool) -> None:
    spec = place.spec
    rank = layer.rank
    if rank > place.rank:
        raise RankOverCapacityError(
            f"layer {name!r}: the adapter's rank {rank} exceeds the capacity's rank {place.rank} there; "
            f"raise Capacity.max_rank (or its layer_ranks entry) to {rank}",
            name,
            rank,
            place.rank,
        )
    if rank % spec.groups:
        raise ShapeMismatchError(
            f"layer {name!r}: rank {rank} is not a multiple of the conv's groups={spec.groups}; "
            "PEFT cannot build such an adapter either: retrain with a rank divisible by groups"
        )
    expected = {
        "lora_A": (rank, *spec.a_tail),
        "lora_B": (spec.out, rank // spec.groups, *([1] * spec.b_trailing)),
    }
    tensors = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}
    if layer.lora_bias is not None:
        if not has_bias:
            raise CapacityError(
                f"layer {name!r}: the adapter has a LoRA bias (lora_bias=True) but the capacity has no room "
                "for one; attach with Capacity(lora_bias=True)"
            )
        expected["lora_bias"] = (spec.out,)
        tensors["lora_bias"] = layer.lora_bias
    for role, tensor in tensors.items():
        if tuple(tensor.shape) != expected[role]:
            raise ShapeMismatchError(
                f"layer {name!r}: {role} has shape {tuple(tensor.shape)} but the layer needs {expected[role]}; "
                "the adapter was trained for a different base model"
            )
        if not tensor.is_floating_point():
            raise ShapeMismatchError(f"layer {name!r}: {role} has dtype {tensor.dtype}; LoRA weights must be floating point")
    if not math.isfinite(layer.scaling):
        raise NonFiniteError(f"layer {name!r}: scaling is {layer.scaling}; check lora_alpha and r in the config")


def _check_values(layers: Iterable[tuple[str, LayerLora, torch.dtype | None]]) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor with a NaN or inf, or a value beyond its layer's
    dtype (None: finite is enough). A norm within the dtype's range bounds every value, so one float32
    norm per tensor answers the common case; only a failure looks at elements."""
    named = [
        (name, role, tensor, dtype)
        for name, layer, dtype in layers
        for role, tensor in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B), ("lora_bias", layer.lora_bias))
        if tensor is not None and tensor.numel()
    ]
    limits = [torch.finfo(dtype or torch.float32).max for *_, dtype in named]
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
    return _norms_within(tensors, [torch.finfo(torch.float32).max] * len(tensors)) or all(
        bool(torch.isfinite(tensor).all()) for tensor in tensors
    )


def _norms_within(tensors: Sequence[torch.Tensor], limits: Sequence[float]) -> bool:
    """Whether each tensor's float32 norm is at most its limit (NaN and inf propagate through a norm, so they fail).

    One ``_foreach_norm``: ``torch.isfinite(t).all()`` and ``_foreach_norm(ord=inf)`` are 50-100x slower on CPU."""
    if not tensors:
        return True
    norms = torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32))
    return bool((norms <= torch.tensor(limits)).all())


def _padded_pairs(
    layer: LayerLora, spec: SlotSpec, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(padded destination, source)`` pairs that copy PEFT's ``lora_A [r, ...]`` / ``lora_B [out, r/groups, ...]``
    into zero-padded ``[R, ...]`` / dense ``[out, R]``.

    Grouped convs keep each group's rank block at the start of that group's padded block, and
    ``lora_B`` becomes block-diagonal, so the dense 1x1 expand equals PEFT's grouped one.
    """
    groups = spec.groups
    rank_in, rank_out = layer.rank // groups, lora_A.shape[0] // groups
    outs = spec.out // groups
    source_B = layer.lora_B.reshape(spec.out, rank_in)
    pairs = []
    for g in range(groups):
        pairs.append((lora_A[g * rank_out : g * rank_out + rank_in], layer.lora_A[g * rank_in : (g + 1) * rank_in]))
        pairs.append(
            (lora_B[g * outs : (g + 1) * outs, g * rank_out : g * rank_out + rank_in], source_B[g * outs : (g + 1) * outs])
        )
    return pairs
