"""Tensor-parallel models: slot layers on layers sharded as DTensors, by torch's ``parallelize_module``
or transformers' ``tp_plan`` (same styles, same placements).

Each rank holds slot buffers for its shard only, as plain local tensors of fixed shape:

- a colwise layer (``ColwiseParallel`` Linear, weight ``Shard(0)``; or Embedding, weight ``Shard(1)``)
  returns this rank's slice of the output features, so its slots hold ``lora_B`` rows for that slice
  and ``lora_A`` whole; the slot layer is the ordinary one, its output already matches the shard;
- a rowwise Linear (``RowwiseParallel``, weight ``Shard(1)``) reads this rank's slice of the input
  features, so its slots hold ``lora_A`` columns for that slice and ``lora_B`` whole. Since
  ``B (sum_r A_r x_r) = sum_r B A_r x_r``, each rank adds its partial LoRA sum to its partial base
  matmul and one all-reduce (the one the base layer does anyway) sums both; the bias (and a LoRA
  bias, which only rank 0 holds) is added once.

Every rank reads only its slice of each tensor of an adapter file (safetensors ``get_slice``),
validates it, and agrees with the other ranks before the first write (:func:`agree`): a load that
fails on any rank writes nothing on any rank, and every rank raises the same :class:`HotswapError`.
Routing verbs are local writes: every rank must call the same verbs with the same arguments, as it
runs the same forwards (SPMD). Plans loraswap does not handle (sequence parallel, gathered outputs,
rowwise embeddings, meshes of more than one dimension) are refused at ``attach``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from .adapter import Adapter, AdapterSource, load_adapter
from .errors import HotswapError, ShapeMismatchError, ShardingError
from .layers import SlotEmbedding, SlotLayer, SlotLinear, SlotSpec
from .layout import PackedAdapter
from .swap import AdapterSlots

Result = TypeVar("Result")
Style = Literal["colwise", "rowwise"]

# (slot layer class, weight placement) -> style
_STYLES: dict[tuple[type[SlotLayer], Any], Style] = {
    (SlotLinear, Shard(0)): "colwise",
    (SlotEmbedding, Shard(1)): "colwise",
    (SlotLinear, Shard(1)): "rowwise",
}
_LAYOUTS = {  # style -> (ParallelStyle, input_layouts, output_layouts, use_local_output)
    "colwise": (ColwiseParallel, (Replicate(),), (Shard(-1),), True),
    "rowwise": (RowwiseParallel, (Shard(-1),), (Replicate(),), True),
}

_SHARDED_DIM = {"colwise": {"lora_B": 0, "lora_bias": 0}, "rowwise": {"lora_A": 1}}  # style -> role -> dim cut


@dataclass(frozen=True)
class LayerShard:
    """This rank's slice ``[start, stop)`` of one layer's sharded feature dimension (``full`` long)."""

    name: str
    style: Style
    weight_dim: int  # the base weight's sharded dimension
    start: int
    stop: int
    full: int
    rank: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def spec(self, spec: SlotSpec) -> SlotSpec:
        """The slot spec of this rank's shard: colwise keeps ``size`` outputs, rowwise ``size`` inputs."""
        if self.style == "colwise":
            return replace(spec, out=self.size)
        return replace(spec, a_tail=(self.size, *spec.a_tail[1:]))

    def take(self, role: str, tensor: Any) -> torch.Tensor | None:
        """This rank's part of ``tensor`` (a torch tensor or a safetensors slice), or None if it is not sharded.

        Colwise: ``lora_B [out, r]`` and ``lora_bias [out]`` by output rows. Rowwise: ``lora_A [r, in]``
        by input columns; the LoRA bias stays whole on rank 0 and is zero elsewhere (the all-reduce adds it once).
        A base weight PEFT saved beside the adapter is cut as the model's weight is.
        """
        if role == "base_weight":
            return tensor[self.start : self.stop] if self.weight_dim == 0 else tensor[:, self.start : self.stop]
        if self.style == "rowwise" and role == "lora_bias":
            whole = tensor[:]
            return whole if self.rank == 0 else torch.zeros_like(whole)
        dim = _SHARDED_DIM[self.style].get(role)
        if dim is None:
            return None
        shape = tuple(tensor.get_shape() if hasattr(tensor, "get_shape") else tensor.shape)
        if len(shape) <= dim or shape[dim] != self.full:
            feature = "output features" if self.style == "colwise" else "input features"
            raise ShapeMismatchError(
                f"layer {self.name!r}: {role} has shape {shape} but the unsharded layer has {self.full} {feature}; "
                "the adapter was trained for a different base model"
            )
        return tensor[self.start : self.stop] if dim == 0 else tensor[:, self.start : self.stop]


class PartialLinear(nn.Module):
    """A rowwise-sharded Linear's local matmul, ``x_local @ W_local^T``: this rank's partial sum, no bias.

    It holds the sharded layer's own parameters (same objects, same state-dict names).
    """

    def __init__(self, sharded: nn.Linear) -> None:
        super().__init__()
        self.weight = sharded.weight
        self.bias = sharded.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to_local())


class RowwiseSlotLinear(SlotLinear):
    """A ``RowwiseParallel`` Linear with slots: local base matmul plus local LoRA, one all-reduce, then the bias."""

    def __init__(self, base_layer: nn.Linear, *buffers_and_router: Any) -> None:
        super().__init__(PartialLinear(base_layer), *buffers_and_router)
        self.mesh = base_layer.weight.device_mesh

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if isinstance(x, DTensor):  # an upstream layer kept its DTensor output: what RowwiseParallel's input hook does
            x = x.redistribute(placements=(Shard(-1),)).to_local()
        output = funcol.all_reduce(super().forward(x, *args, **kwargs), "sum", self.mesh)
        bias = self.base_layer.bias
        return output if bias is None else output + bias.to_local()


class ShardPlan:
    """Which target layers are sharded, how, and this rank's slice of each: decided once at ``attach``."""

    def __init__(self, shards: dict[str, LayerShard], mesh: DeviceMesh | None) -> None:
        self.shards = shards
        self.mesh = mesh

    def __bool__(self) -> bool:
        return bool(self.shards)

    @classmethod
    def detect(cls, targets: Iterable[tuple[str, nn.Module, type[SlotLayer]]]) -> ShardPlan:
        """The shards of every target whose weight is a DTensor; raise :class:`ShardingError` for plans not handled."""
        shards: dict[str, LayerShard] = {}
        meshes = set()
        for name, module, layer_class in targets:
            weight = getattr(module, "weight", None)
            if not isinstance(weight, DTensor):
                continue
            style = _style_of(name, module, layer_class, weight)
            mesh = weight.device_mesh
            meshes.add(mesh)
            dim = weight.placements[0].dim  # the weight dimension this rank holds a slice of
            local, offset = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
            start = offset[dim]
            shards[name] = LayerShard(
                name, style, dim, start, start + local[dim], weight.shape[dim], mesh.get_local_rank()
            )
        if len(meshes) > 1:
            raise ShardingError(
                f"the target layers are sharded over {len(meshes)} different device meshes; "
                "loraswap needs every sharded target on one tensor-parallel mesh"
            )
        return cls(shards, meshes.pop() if meshes else None)

    def spec(self, name: str, spec: SlotSpec) -> SlotSpec:
        shard = self.shards.get(name)
        return spec if shard is None else shard.spec(spec)

    def layer_class(self, name: str, layer_class: type[SlotLayer]) -> type[SlotLayer]:
        shard = self.shards.get(name)
        return RowwiseSlotLinear if shard is not None and shard.style == "rowwise" else layer_class

    def take(self, module: str, role: str, tensor: Any) -> torch.Tensor | None:
        """This rank's part of one adapter tensor, or None when its layer is not sharded (read it whole)."""
        shard = self.shards.get(module)
        return None if shard is None else shard.take(role, tensor)

    def read(self, source: AdapterSource, allow_pickle: bool = False) -> Adapter:
        """``source`` with every tensor cut to this rank's slice; safetensors files are read slice by slice."""
        if isinstance(source, Adapter):
            return self.slice(source)
        return load_adapter(source, allow_pickle=allow_pickle, shard=self.take)

    def slice(self, adapter: Adapter) -> Adapter:
        """An in-memory adapter cut to this rank's slices (views, no copy)."""

        def own(name: str, role: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
            part = None if tensor is None else self.take(name, role, tensor)
            return tensor if part is None else part

        layers = {
            name: replace(
                layer,
                lora_A=own(name, "lora_A", layer.lora_A),
                lora_B=own(name, "lora_B", layer.lora_B),
                lora_bias=own(name, "lora_bias", layer.lora_bias),
            )
            for name, layer in adapter.layers.items()
        }
        base_weights = {name: own(name, "base_weight", weight) for name, weight in adapter.base_weights.items()}
        return replace(adapter, layers=layers, base_weights=base_weights)


def _style_of(name: str, module: nn.Module, layer_class: type[SlotLayer], weight: DTensor) -> Style:
    """``colwise`` or ``rowwise`` for a layer sharded the way loraswap handles, else :class:`ShardingError`."""
    placements = tuple(weight.placements)
    where = f"layer {name!r} ({type(module).__name__}, weight placements {placements})"
    if weight.device_mesh.ndim != 1:
        raise ShardingError(
            f"{where} is sharded over a {weight.device_mesh.ndim}-D device mesh; loraswap handles a 1-D "
            "tensor-parallel mesh: leave the layer out of Capacity.target_modules or shard it over one dimension"
        )
    style = _STYLES.get((layer_class, placements[0]))
    if style is None:
        raise ShardingError(
            f"{where}: loraswap handles ColwiseParallel/RowwiseParallel nn.Linear and ColwiseParallel nn.Embedding; "
            "leave this layer out of Capacity.target_modules or of the parallelize plan"
        )
    parallel_style, inputs, outputs, use_local = _LAYOUTS[style]
    found = _hook_layouts(module, parallel_style)
    if found is None:
        raise ShardingError(
            f"{where} has DTensor weights but no {parallel_style.__name__} of torch's parallelize_module or of "
            "transformers' tp_plan: loraswap cannot tell how its inputs and outputs are laid out; shard it with "
            "one of those, or leave it out of Capacity.target_modules"
        )
    if found != (inputs, outputs, use_local):
        raise ShardingError(
            f"{where} is {style} with (input_layouts, output_layouts, use_local_output) = {found}; loraswap handles "
            f"{parallel_style.__name__}'s defaults {(inputs, outputs, use_local)} (no sequence parallel, no gathered "
            "output): use the default layouts there or leave the layer out of Capacity.target_modules"
        )
    return style


def _hook_layouts(module: nn.Module, parallel_style: type) -> tuple | None:
    """``(input_layouts, output_layouts, use_local_output)`` of the ``parallel_style`` that sharded ``module``.

    torch's ``parallelize_module`` registers hooks: lambdas that close over ``partial(style._prepare_*_fn,
    layouts...)``. transformers' ``tp_plan`` replaces ``module.forward`` by a closure over its own style of the
    same name. None when neither is found.
    """
    partials = {}
    for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
        for value in _closure_values(hook):
            if isinstance(value, functools.partial):
                partials[value.func] = value.args
    input_args = partials.get(parallel_style._prepare_input_fn)
    output_args = partials.get(parallel_style._prepare_output_fn)
    if input_args is not None and output_args is not None:
        return (input_args[0], *output_args)
    for style in _closure_values(module.__dict__.get("forward")):
        if type(style).__name__ == parallel_style.__name__ and type(style).__module__.startswith("transformers."):
            return ((style.input_layouts,), (style.output_layouts,), style.use_local_output)
    return None


def _closure_values(function: Any) -> list[Any]:
    return [cell.cell_contents for cell in getattr(function, "__closure__", None) or ()]


def refuse_sharded(model: nn.Module, feature: str) -> None:
    """Raise :class:`ShardingError` when ``model`` holds DTensor parameters and ``feature`` cannot take them."""
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            raise ShardingError(
                f"parameter {name!r} is a DTensor (placements {tuple(param.placements)}); {feature} does not "
                "support tensor-parallel models: attach with mode='slots'"
            )


def agree(mesh: DeviceMesh, build: Callable[[], Result]) -> Result:
    """``build()`` on every rank of ``mesh``: its result if it succeeded everywhere, else the same error on every rank.

    A successful call costs one all-reduce of one integer; a failure gathers the first failing rank's
    error type and message, and every rank raises it (prefixed with that rank) before anything is written.
    """
    try:
        result, error = build(), None
    except Exception as err:  # noqa: BLE001 - any rank's failure must reach every rank, or the others would hang
        result, error = None, err
    group = mesh.get_group()
    failed = torch.tensor([error is not None], dtype=torch.int32, device=mesh.device_type)
    dist.all_reduce(failed, group=group)
    if not int(failed):
        return result
    errors: list[tuple[type[HotswapError], str, dict[str, Any]] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, _portable(error), group=group)
    rank, (kind, message, attributes) = next((rank, item) for rank, item in enumerate(errors) if item is not None)
    raise _rebuilt(kind, f"rank {rank} of {len(errors)}: {message}", attributes) from error


def _portable(error: Exception | None) -> tuple[type[HotswapError], str, dict[str, Any]] | None:
    """What every rank needs to raise ``error`` again: its type, message and attributes (picklable)."""
    if error is None:
        return None
    if isinstance(error, HotswapError):
        return type(error), str(error), dict(vars(error))
    return HotswapError, f"{type(error).__name__}: {error}", {}


def _rebuilt(kind: type[HotswapError], message: str, attributes: dict[str, Any]) -> HotswapError:
    """A ``kind`` with ``message`` and the failing rank's attributes (``layer``, ``rank``, ...), built without
    calling ``kind.__init__``, whose signature differs between error types."""
    error = kind.__new__(kind, message)
    error.args = (message,)
    error.__dict__.update(attributes)
    return error


class TensorParallelSlots(AdapterSlots):
    """:class:`AdapterSlots` on a tensor-parallel model: each rank packs its slices; loads agree across ranks.

    Call every verb on every rank with the same arguments, in the same order (``load`` and ``packed`` are
    collectives; ``prefetch`` is not: it fills this rank's cache, and the next ``load`` agrees).
    """

    def __init__(self, *args: Any, shards: ShardPlan, check_rows: bool = False) -> None:
        super().__init__(*args, check_rows=check_rows)
        self.shards = shards

    def read_packed(self, source: AdapterSource, allow_pickle: bool = False) -> PackedAdapter:
        return super().pack(self.shards.read(source, allow_pickle))

    def pack(self, adapter: Adapter) -> PackedAdapter:
        """This rank's slices of a whole in-memory ``adapter``, validated and padded (no collective, no write)."""
        return super().pack(self.shards.slice(adapter))

    def _base_weight(self, name: str) -> torch.Tensor:
        weight = super()._base_weight(name)
        return weight.to_local() if isinstance(weight, DTensor) else weight

    def packed(self, source: AdapterSource, *, allow_pickle: bool = False) -> PackedAdapter:
        """A collective: every rank gets its slices packed (from its cache, else read, validated, padded), or every
        rank raises the same error. ``load`` and the pool go through it, so no rank writes unless all can."""
        packed_here = super().packed
        return agree(self.shards.mesh, lambda: packed_here(source, allow_pickle=allow_pickle))

    def load(self, source: AdapterSource, slot: int = 0, *, allow_pickle: bool = False) -> None:
        """A collective, always through :meth:`packed` (this rank's slices, agreed), also without a host cache."""
        self.router.check_slot(slot)
        self.load_packed(self.packed(source, allow_pickle=allow_pickle), slot)

    def __repr__(self) -> str:
        return (
            f"TensorParallelSlots(rank={self.shards.mesh.get_local_rank()} of {self.shards.mesh.size()}, "
            f"sharded_layers={len(self.shards.shards)}/{len(self.layout.placements)}, slots={self.capacity.slots}, "
            f"slot_bytes_per_rank={self.layout.slot_nbytes}, loaded={self._loaded})"
        )

