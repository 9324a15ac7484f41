"""Where every slot layer's tensors live, and how an adapter is packed into that layout.

All slot buffers of one dtype share one flat tensor ``weights[slots, numel]``: slot ``s`` of every
layer is a view at a fixed offset into row ``s``. Scalings live in ``scales[slots, layers]``
(float32, so bf16 models keep exact alpha/r). An adapter packed into the same layout
(:class:`PackedAdapter`) is what the host cache keeps.

A row is stored rank-major (:class:`RankBlock`): the layers that share a capacity rank ``R`` form
one block of ``R`` rank rows, and rank row ``k`` holds each of those layers' ``lora_A[k]`` and
``lora_B[:, k]`` side by side. ``lora_A`` and ``lora_B`` are strided views into it. So an adapter
of rank ``r`` lives in the block's first ``r`` rows (its live rows), one contiguous span: a swap
copies those rows (one copy per block, not per tensor) and nothing else
(:meth:`SlotLayout.copy_views`).

The rows past them are never zeroed: they may still hold what the slot's previous, larger adapter
wrote there (finite: validated). Each slot row has a live mask, ``live[slots, rows]`` (bool, one
entry per rank row of every block), and every kernel selects ``where(live, hidden, 0)`` on the
shrunk activations, so a rank row past the live ones adds exactly 0 whatever it holds. A swap from
rank 64 down to 8 thus moves the 8 rows and one small mask, not 56 rows of zeros. Inside the live
rows the slot holds exactly the zero-padded adapter (the rank padding of its smaller layers and the
layers it does not target are zeroed there).

:meth:`SlotLayout.pack` validates everything (targets, ranks, shapes, dtypes, finite values)
before it builds anything, and builds only fresh host tensors: the model is never touched.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
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
from .value_checks import check_dora_room, check_values

if TYPE_CHECKING:
    from .fused import FusedAdapter

ALIGN_BYTES = 64


@dataclass(frozen=True)
class RankBlock:
    """The layers of one group that share a capacity rank: ``rows`` rank rows of ``width`` elements from ``offset``."""

    offset: int
    width: int
    rows: int
    live_offset: int  # where its rows start in the group's live mask row

    def span(self, start: int, stop: int) -> slice:
        """Rank rows ``[start, stop)`` of the block, as a slice of the flat row."""
        return slice(self.offset + start * self.width, self.offset + stop * self.width)


LiveRows = tuple[tuple[int, ...], ...]  # per group, per block: how many leading rank rows an adapter fills


@dataclass(frozen=True)
class LayerPlacement:
    """One layer's rank and offsets inside its group's flat slot row.

    ``a_offset``/``b_offset``: where rank row 0 of ``lora_A``/``lora_B`` starts; rank row ``k`` is
    ``row_stride`` elements further (see the module docstring).
    """

    name: str
    spec: SlotSpec
    rank: int
    group: int
    scale_index: int
    block: int
    row_stride: int
    a_offset: int
    b_offset: int
    bias_offset: int | None
    dora_offset: int | None = None  # DoRA's per-output vector g - 1 (see loraswap.dora), after the biases

    def filled_rows(self, rank: int) -> int:
        """Rank rows an adapter layer of rank ``rank`` fills: its rank, or for a grouped conv up to the last
        group's block (each group's rank block starts at its own padded block, see ``_padded_pairs``)."""
        groups = self.spec.groups
        return rank if groups == 1 else (groups - 1) * (self.rank // groups) + rank // groups

    @property
    def a_shape(self) -> tuple[int, ...]:
        return (self.rank, *self.spec.a_tail)

    @functools.cached_property
    def a_strides(self) -> tuple[int, ...]:
        """``lora_A``'s strides in a flat row: ``row_stride`` per rank row, then its tail dims contiguous."""
        a_tail = self.spec.a_tail
        return (self.row_stride, *(math.prod(a_tail[i + 1 :]) for i in range(len(a_tail))))

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
    blocks: tuple[RankBlock, ...]
    bias: slice | None  # every layer's lora_bias, after the blocks
    dora: slice | None = None  # every layer's DoRA vector, after the biases

    @property
    def live_width(self) -> int:
        """Entries of the group's live mask row: one per rank row of every block."""
        return sum(block.rows for block in self.blocks)


@dataclass(frozen=True)
class SlotStorage:
    """The device tensors every slot layer's buffers are views of."""

    weights: tuple[torch.Tensor, ...]  # per group: [slots, numel]
    scales: tuple[torch.Tensor, ...]  # per group: [slots, layers], float32
    live: tuple[torch.Tensor, ...]  # per group: [slots, live_width], bool: which rank rows each slot's adapter fills

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor a slot layer reads: weights, scales and live masks."""
        return (*self.weights, *self.scales, *self.live)


@dataclass(frozen=True)
class PackedAdapter:
    """An adapter laid out exactly as one slot row: what the cache keeps and a swap copies."""

    weights: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor, ...]
    live: tuple[torch.Tensor, ...]  # per group: the slot's live mask row for it
    source: str
    targets: frozenset[str]
    layout: SlotLayout = field(repr=False, compare=False)  # the layout it was packed for: only that one can take it
    live_rows: LiveRows  # the rank rows it fills (the rest of each block is zero): what a swap copies
    copy_sources: tuple[torch.Tensor, ...] = field(repr=False, compare=False)  # SlotLayout.copy_views of its tensors
    has_dora: bool = False  # a DoRA adapter (served at strength 0 or 1 only, see loraswap.dora)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.weights, *self.scales, *self.live))

    @property
    def live_numel(self) -> tuple[int, ...]:
        """Per group, the elements a swap copies: its live rank rows and the biases."""
        return tuple(
            sum(rows * block.width for block, rows in zip(group.blocks, live))
            + (0 if group.bias is None else group.bias.stop - group.bias.start)
            for group, live in zip(self.layout.groups, self.live_rows)
        )


def check_packed_for(packed: PackedAdapter | FusedAdapter, layout: SlotLayout) -> None:
    """Refuse an adapter that was packed for another model's slots (its bytes would land in the wrong places)."""
    if packed.layout is not layout:
        raise SlotError(
            f"{packed.source} was packed for another attached model; pack it with this model's slots "
            "(slots.pack(adapter) or slots.packed(source)) before load_packed"
        )


class SlotLayout:
    """The fixed placement of every slot layer's LoRA tensors, decided once at ``attach``."""

    def __init__(
        self, placements: dict[str, LayerPlacement], groups: list[Group], has_bias: bool, has_dora: bool = False
    ) -> None:
        self.placements = placements
        self.groups = groups
        self.has_bias = has_bias
        self.has_dora = has_dora

    @classmethod
    def plan(cls, targets: Iterable[tuple[str, nn.Module, SlotSpec]], capacity: Capacity) -> SlotLayout:
        """Group the layers by dtype and device, and each group's layers by capacity rank into rank-major blocks."""
        layers: list[tuple[str, SlotSpec, int, int]] = []  # name, spec, capacity rank, group
        group_keys: list[tuple[torch.dtype, torch.device]] = []
        for name, module, spec in targets:
            key = (module.weight.dtype, module.weight.device)
            if key not in group_keys:
                group_keys.append(key)
            rank = capacity.rank_for(name)
            if rank % spec.groups:
                raise CapacityError(
                    f"layer {name!r} is a conv with groups={spec.groups}; its capacity rank {rank} must be a "
                    f"multiple of {spec.groups}: set Capacity.max_rank (or layer_ranks) accordingly"
                )
            layers.append((name, spec, rank, group_keys.index(key)))
        placements: dict[str, LayerPlacement] = {}
        groups = []
        for group, (dtype, device) in enumerate(group_keys):
            members = [(name, spec, rank) for name, spec, rank, member_group in layers if member_group == group]
            align = max(ALIGN_BYTES // dtype.itemsize, 1)
            numel, blocks, bias, dora, group_placements = _plan_group(
                group, members, align, capacity.lora_bias, capacity.dora
            )
            groups.append(Group(dtype, device, numel, len(members), blocks, bias, dora))
            placements.update((place.name, place) for place in group_placements)
        placements = {name: placements[name] for name, *_ in layers}  # the model's order
        return cls(placements, groups, capacity.lora_bias, capacity.dora)

    @property
    def slot_nbytes(self) -> int:
        """Bytes one slot (or one cached adapter) takes."""
        return sum(g.numel * g.dtype.itemsize + g.layers * 4 + g.live_width for g in self.groups)

    def allocate(self, slots: int) -> SlotStorage:
        return SlotStorage(
            weights=tuple(torch.zeros(slots, g.numel, dtype=g.dtype, device=g.device) for g in self.groups),
            scales=tuple(torch.zeros(slots, g.layers, dtype=torch.float32, device=g.device) for g in self.groups),
            live=tuple(torch.zeros(slots, g.live_width, dtype=torch.bool, device=g.device) for g in self.groups),
        )

    def views(self, weights: torch.Tensor, scales: torch.Tensor, live: torch.Tensor, name: str):
        """``(lora_A, lora_B, scale, live, lora_bias)`` of one layer inside ``weights [..., numel]``,
        ``scales [..., layers]`` and ``live [..., live_width]``.

        ``lora_A [..., R, *a_tail]`` and ``lora_B [..., out, R]`` step ``row_stride`` elements per rank row;
        ``live [..., R]`` says which of those rows the slot's adapter fills.
        """
        place = self.placements[name]
        block = self.groups[place.group].blocks[place.block]
        live_rows = live[..., block.live_offset : block.live_offset + block.rows]
        return *_weight_views(weights, place), scales[..., place.scale_index], live_rows, _bias_view(weights, place)

    def dora_view(self, weights: torch.Tensor, name: str) -> torch.Tensor | None:
        """``lora_dora [..., out]`` of one layer inside ``weights [..., numel]`` (None: the capacity has no DoRA)."""
        return _span_view(weights, self.placements[name].dora_offset, self.placements[name].spec.out)

    def live_rows(self, adapter: Adapter) -> LiveRows:
        """The rank rows of each block that ``adapter`` fills (a validated adapter: every layer has a placement)."""
        rows = [[0] * len(group.blocks) for group in self.groups]
        for name, layer in adapter.layers.items():
            place = self.placements[name]
            block = rows[place.group]
            block[place.block] = max(block[place.block], place.filled_rows(layer.rank))
        return tuple(map(tuple, rows))

    def live_masks(self, live: LiveRows) -> tuple[torch.Tensor, ...]:
        """Per group, the live mask row of an adapter that fills ``live`` (host tensors)."""
        masks = []
        for group, rows in zip(self.groups, live):
            mask = torch.zeros(group.live_width, dtype=torch.bool)
            for block, filled in zip(group.blocks, rows):
                mask[block.live_offset : block.live_offset + filled] = True
            masks.append(mask)
        return tuple(masks)

    def copy_views(
        self,
        weights: Sequence[torch.Tensor],
        scales: Sequence[torch.Tensor],
        live: Sequence[torch.Tensor],
        live_rows: LiveRows,
    ) -> tuple[torch.Tensor, ...]:
        """What a swap of an adapter filling ``live_rows`` copies, as views of one slot row (one tensor per group in
        each of ``weights``/``scales``/``live``): its live rank rows (one span per block), the biases, the scales
        and the live masks. The same call on the slot's row and on a :class:`PackedAdapter`'s tensors gives the
        destinations and sources of one ``_foreach_copy_``; the rows past the live ones keep whatever they held,
        and the mask keeps them out of every forward (see the module docstring)."""
        views = []
        for group, row, filled in zip(self.groups, weights, live_rows):
            views += [row[block.span(0, rows)] for block, rows in zip(group.blocks, filled) if rows]
            views += [row[span] for span in (group.bias, group.dora) if span is not None]
        return (*views, *scales, *live)

    def zero_rows(
        self, weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor], live: Sequence[torch.Tensor]
    ) -> None:
        """Make one slot row add nothing: zero its scales, live mask, biases and DoRA vectors (its rank rows are
        masked out)."""
        biases = [row[span] for group, row in zip(self.groups, weights) for span in (group.bias, group.dora) if span is not None]
        torch._foreach_zero_([*biases, *scales, *live])

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
            _validate_layer(name, layer, place, self.has_bias, self.has_dora)
        check_values(
            (name, layer, self.groups[self.placements[name].group].dtype if cast else None)
            for name, layer in adapter.layers.items()
        )

    def fill(
        self,
        adapter: Adapter,
        weights: Sequence[torch.Tensor],
        scales: Sequence[torch.Tensor],
        live: Sequence[torch.Tensor],
        *,
        fresh: bool = False,
    ) -> LiveRows:
        """Write a validated ``adapter`` into one slot row (one tensor per group in each of ``weights``/``scales``/
        ``live``); return its live rows.

        Every tensor is copied once, straight into its padded place (one ``_foreach_copy_``), and inside the
        adapter's live rows what it does not cover is zeroed (one ``_foreach_zero_``): the rank padding of its
        smaller layers, the layers it does not target and the biases it lacks. ``fresh``: the row is all zero
        already (a new host tensor), so nothing needs zeroing. Rows past the live ones are left as they are (the
        live mask hides them), and the alignment gaps between layers are never written: zero since ``attach``.
        """
        live_rows = self.live_rows(adapter)
        scale_values = [[0.0] * g.layers for g in self.groups]
        destinations: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        pads: list[torch.Tensor] = []
        for name, place in self.placements.items():
            layer = adapter.layers.get(name)
            rows = live_rows[place.group][place.block]
            written = 0 if layer is None or place.spec.groups > 1 else layer.rank  # grouped convs: block-diagonal B
            stale_bias = place.bias_offset is not None and (layer is None or layer.lora_bias is None)
            stale_dora = place.dora_offset is not None and (layer is None or layer.dora is None)
            pad = not fresh and (written < rows or stale_bias or stale_dora)
            if layer is None and not pad:
                continue
            lora_A, lora_B = _weight_views(weights[place.group], place)
            bias = _bias_view(weights[place.group], place)
            dora = _span_view(weights[place.group], place.dora_offset, place.spec.out)
            if pad:
                pads += [lora_A[written:rows], lora_B[:, written:rows]]
                pads += [bias] if stale_bias else []
                pads += [dora] if stale_dora else []
            if layer is None:
                continue
            if layer.magnitude is not None:  # only loraswap.dora.resolve_dora's output may reach a slot
                raise UnsupportedAdapterError(
                    f"layer {name!r}: {adapter.source} is DoRA and was not resolved against the base weights; load it "
                    "through AdapterSlots.load/pack, which computes its magnitude-over-norm vectors"
                )
            for destination, source in _padded_pairs(layer, place.spec, lora_A, lora_B):
                destinations.append(destination)
                sources.append(source)
            if layer.lora_bias is not None:
                destinations.append(bias)
                sources.append(layer.lora_bias)
            if layer.dora is not None:
                destinations.append(dora)
                sources.append(layer.dora)
            scale_values[place.group][place.scale_index] = layer.scaling
        pads = [pad for pad in pads if pad.numel()]
        if pads:
            torch._foreach_zero_(pads)
        if destinations:
            torch._foreach_copy_(destinations, sources)
        for scale, values in zip(scales, scale_values):
            scale.copy_(torch.tensor(values, dtype=torch.float32))
        for mask, values in zip(live, self.live_masks(live_rows)):
            mask.copy_(values)
        return live_rows

    def pack(self, adapter: Adapter, pin_memory: bool = False) -> PackedAdapter:
        """Validate ``adapter``, then lay it out as one slot row on the host (one pass, see :meth:`fill`)."""
        self.validate(adapter, cast=True)
        weights = tuple(torch.zeros(g.numel, dtype=g.dtype, pin_memory=pin_memory) for g in self.groups)
        scales = tuple(torch.zeros(g.layers, dtype=torch.float32, pin_memory=pin_memory) for g in self.groups)
        live = tuple(torch.zeros(g.live_width, dtype=torch.bool, pin_memory=pin_memory) for g in self.groups)
        live_rows = self.fill(adapter, weights, scales, live, fresh=True)
        sources = self.copy_views(weights, scales, live, live_rows)
        return PackedAdapter(
            weights, scales, live, adapter.source, adapter.target_names, self, live_rows, sources, adapter.has_dora
        )


def _plan_group(
    group: int, members: list[tuple[str, SlotSpec, int]], align: int, has_bias: bool, has_dora: bool = False
) -> tuple[int, tuple[RankBlock, ...], slice | None, slice | None, list[LayerPlacement]]:
    """One group's flat row: a rank-major block per capacity rank (each layer's A row and B column side by side
    in every rank row, ``align``-element aligned), then the biases, then the DoRA vectors.
    Returns (numel, blocks, bias span, DoRA span, placements)."""
    ranks = list(dict.fromkeys(rank for _, _, rank in members))
    columns: dict[str, tuple[int, int]] = {}  # name -> (A column, B column) in its block's rows
    widths = [0] * len(ranks)
    for name, spec, rank in members:
        block = ranks.index(rank)
        a_column = widths[block]
        columns[name] = (a_column, a_column + _aligned(math.prod(spec.a_tail), align))
        widths[block] = columns[name][1] + _aligned(spec.out, align)
    blocks, numel, live_offset = [], 0, 0
    for rank, width in zip(ranks, widths):
        blocks.append(RankBlock(numel, width, rank, live_offset))
        numel += rank * width
        live_offset += rank
    bias_start = numel
    bias_offsets: list[int | None] = [None] * len(members)
    dora_offsets: list[int | None] = [None] * len(members)
    for offsets, present in ((bias_offsets, has_bias), (dora_offsets, has_dora)):
        for index, (_, spec, _) in enumerate(members):
            if present:
                offsets[index], numel = numel, numel + _aligned(spec.out, align)
    dora_start = bias_start if not has_bias else bias_start + sum(_aligned(spec.out, align) for _, spec, _ in members)
    placements = []
    for index, (name, spec, rank) in enumerate(members):
        block = ranks.index(rank)
        a_offset, b_offset = (blocks[block].offset + column for column in columns[name])
        placements.append(
            LayerPlacement(
                name, spec, rank, group, index, block, widths[block], a_offset, b_offset,
                bias_offsets[index], dora_offsets[index],
            )
        )
    bias = slice(bias_start, dora_start) if has_bias else None
    dora = slice(dora_start, numel) if has_dora else None
    return numel, tuple(blocks), bias, dora, placements


def _weight_views(weights: torch.Tensor, place: LayerPlacement) -> tuple[torch.Tensor, torch.Tensor]:
    """``lora_A [..., R, *a_tail]`` and ``lora_B [..., out, R]`` of ``place`` inside ``weights [..., numel]``."""
    lead, lead_strides = weights.shape[:-1], weights.stride()[:-1]
    start = weights.storage_offset()
    lora_A = weights.as_strided((*lead, *place.a_shape), (*lead_strides, *place.a_strides), start + place.a_offset)
    lora_B = weights.as_strided(
        (*lead, place.spec.out, place.rank), (*lead_strides, 1, place.row_stride), start + place.b_offset
    )
    return lora_A, lora_B


def _bias_view(weights: torch.Tensor, place: LayerPlacement) -> torch.Tensor | None:
    return _span_view(weights, place.bias_offset, place.spec.out)


def _span_view(weights: torch.Tensor, offset: int | None, size: int) -> torch.Tensor | None:
    return None if offset is None else weights[..., offset : offset + size]


def _aligned(size: int, align: int) -> int:
    return -(-size // align) * align


def _validate_layer(name: str, layer: LayerLora, place: LayerPlacement, has_bias: bool, has_dora: bool) -> None:
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
    checks = [  # (role, tensor, the shape the layer needs)
        ("lora_A", layer.lora_A, (rank, *spec.a_tail)),
        ("lora_B", layer.lora_B, (spec.out, rank // spec.groups, *([1] * spec.b_trailing))),
    ]
    if layer.lora_bias is not None:
        if not has_bias:
            raise CapacityError(
                f"layer {name!r}: the adapter has a LoRA bias (lora_bias=True) but the capacity has no room "
                "for one; attach with Capacity(lora_bias=True)"
            )
        checks.append(("lora_bias", layer.lora_bias, (spec.out,)))
    if layer.magnitude is not None or layer.dora is not None:
        check_dora_room(name, spec, has_dora)
        if layer.magnitude is not None and layer.magnitude.dim() > 1:  # PEFT's conv magnitude is (1, out, 1, ...)
            checks.append(("lora_magnitude_vector", layer.magnitude, (1, spec.out, *[1] * (layer.magnitude.dim() - 2))))
        elif layer.magnitude is not None:
            checks.append(("lora_magnitude_vector", layer.magnitude, (spec.out,)))
        if layer.dora is not None:
            checks.append(("dora", layer.dora, (spec.out,)))
    for role, tensor, shape in checks:
        if tensor.shape != shape:
            raise ShapeMismatchError(
                f"layer {name!r}: {role} has shape {tuple(tensor.shape)} but the layer needs {shape}; "
                "the adapter was trained for a different base model"
            )
        if not tensor.is_floating_point():
            raise ShapeMismatchError(f"layer {name!r}: {role} has dtype {tensor.dtype}; LoRA weights must be floating point")
    if not math.isfinite(layer.scaling):
        raise NonFiniteError(f"layer {name!r}: scaling is {layer.scaling}; check lora_alpha and r in the config")


def _padded_pairs(
    layer: LayerLora, spec: SlotSpec, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(padded destination, source)`` pairs that copy PEFT's ``lora_A [r, ...]`` / ``lora_B [out, r/groups, ...]``
    into zero-padded ``[R, ...]`` / dense ``[out, R]``.

    Grouped convs keep each group's rank block at the start of that group's padded block, and
    ``lora_B`` becomes block-diagonal, so the dense 1x1 expand equals PEFT's grouped one.
    """
    groups = spec.groups
    if groups == 1:  # nearly every layer: the rank's leading rows, no block-diagonal placement
        rank = layer.rank
        source_B = layer.lora_B.reshape(spec.out, rank) if spec.b_trailing else layer.lora_B
        return [(lora_A[:rank], layer.lora_A), (lora_B[:, :rank], source_B)]
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
