"""Fused mode: the active adapter is merged into the base weights, so a forward costs exactly the base model's.

``attach(model, capacity, mode="fused")`` leaves every layer as it is and returns a :class:`FusedSlots`.
Loading an adapter writes ``W0 + scale * B @ A`` (and ``b0 + scale * lora_bias``) into the base
weight's own storage (a DoRA adapter: ``g * (W0 + scale * B @ A)`` with ``g = m / ||W0 + scale * B @ A||``
per output feature, PEFT's ``merge``; the bias stays ``b0``): same shape, dtype, device and ``data_ptr``, so a compiled graph (CUDA graphs
included) reads the new weights without recompiling and without any per-step LoRA work.

``W0`` comes from a pristine host copy of every targeted weight (and bias, when the capacity has
room for LoRA biases) taken at attach: every merge starts from it, so swaps never accumulate
rounding, and ``unload`` restores the base weights bit for bit. That copy costs
:attr:`FusedSlots.pristine_nbytes` of host memory (the targeted weights once more).

The verbs are those of :class:`~loraswap.swap.AdapterSlots`. Slots are staging places: ``load`` into
the active slot merges at once; ``load`` into another slot only validates and stages it, and
``activate`` merges it (a swap's cost, not a routing write). ``route`` and ``blend`` raise
:class:`~loraswap.errors.ModeError`: one merged adapter serves every row.

A merge is validated fully first (the same checks as slots mode: targets, per-layer ranks, shapes,
finite values). Only an overflow of the merged weight can still fail mid-write; the layers already
written are then merged back from the pristine copy and the previous adapter, with the same
arithmetic, so the model is bit-identical to before.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import Adapter, AdapterSource, LayerLora, load_adapter
from .cache import AdapterCache, cache_key
from .capacity import Capacity
from .errors import CapacityError, LayoutChangedError, ModeError, NonFiniteError, SlotError
from .layers import SlotConv1D, SlotEmbedding, slot_layer_class
from .layout import SlotLayout, check_packed_for
from .value_checks import all_finite, check_saved_base_weights
from .routing import BlendWeights

_FUSED_MODELS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def is_fused(model: nn.Module) -> bool:
    """Whether ``attach(model, ..., mode="fused")`` already ran on ``model``."""
    return model in _FUSED_MODELS


@dataclass(frozen=True)
class FusedTarget:
    """One targeted base layer and its pristine host copy.

    ``weight_major_in`` is True where the weight is stored ``[in, out]`` (transformers' Conv1D,
    Embedding's ``[num_embeddings, dim]``), so the delta is ``A.T @ B.T`` rather than ``B @ A``.
    """

    name: str
    module: nn.Module
    weight_major_in: bool
    pristine_weight: torch.Tensor
    pristine_bias: torch.Tensor | None

    @property
    def compute_dtype(self) -> torch.dtype:
        """Merges of half-precision weights are computed in float32 and rounded once."""
        dtype = self.module.weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class LayerFactors:
    """One layer's merge: ``weight = W0 + scaling * left @ right`` (viewed as 2-D), ``bias = b0 + scaling * bias``;
    with a DoRA ``magnitude``, the merged weight's output features are then rescaled to it (PEFT's DoRA merge)."""

    left: torch.Tensor
    right: torch.Tensor
    scaling: float
    bias: torch.Tensor | None
    magnitude: torch.Tensor | None = None


@dataclass(frozen=True)
class FusedAdapter:
    """A validated adapter in merge form: what the fused-mode cache keeps."""

    layers: dict[str, LayerFactors]
    source: str
    layout: SlotLayout = field(repr=False, compare=False)  # the layout it was validated for: only that one can take it

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for factors in self.layers.values()
            for t in (factors.left, factors.right, factors.bias, factors.magnitude)
            if t is not None
        )


def merge_refusal(module: nn.Module) -> str | None:
    """Why a LoRA on ``module`` cannot be merged into its weight (None when it can).

    A quantized weight (torchao ``Int8Tensor``/``Float8Tensor``, optimum-quanto ``QBytes``, any tensor
    subclass or integer storage, or a quanto layer that quantizes its weight at each forward) cannot
    take ``W0 + scale * B @ A`` exactly: the sum would be re-quantized, or not written at all.
    PEFT's conv LoRA ``A`` is a dense conv over all input channels without the base layer's
    dilation or padding mode; a grouped, dilated or non-zero-padded base conv cannot hold that delta.
    """
    quantized = quantized_weight(module)
    if quantized is not None:
        return (
            f"its weight is quantized ({quantized}); a merged LoRA would be re-quantized (or not written), "
            "so outputs would differ from PEFT's LoRA on the same quantized base. Slots mode is exact there"
        )
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return None
    if module.groups > 1:
        return (
            f"it is a conv with groups={module.groups}: the LoRA's A mixes all input channels, which a grouped "
            "weight cannot hold (PEFT refuses to merge it too)"
        )
    if any(d != 1 for d in module.dilation) and any(k != 1 for k in module.kernel_size):
        return f"it is a conv with dilation={module.dilation}, which PEFT's LoRA conv does not apply"
    padded = module.padding == "same" or (not isinstance(module.padding, str) and any(module.padding))
    if module.padding_mode != "zeros" and padded:
        return f"it is a conv with padding_mode={module.padding_mode!r}, which PEFT's LoRA conv does not apply"
    return None


def quantized_weight(module: nn.Module) -> str | None:
    """What quantizes ``module``'s weight (e.g. ``"torchao Int8Tensor"``), or None for a plain floating-point weight."""
    weight = module.weight
    weight_type = type(weight)
    if weight_type not in (torch.Tensor, nn.Parameter):
        package = weight_type.__module__.split(".")[0].replace("optimum", "optimum-quanto")
        return f"{package} {weight_type.__name__}"
    if not weight.is_floating_point():
        return f"{weight.dtype} storage"
    qtype = getattr(module, "weight_qtype", None)  # optimum-quanto QModuleMixin: quantized at every forward
    if qtype is not None:
        return f"optimum-quanto {type(module).__name__} quantizes it to {getattr(qtype, 'name', qtype)} at each forward"
    return None


def fused_targets(model: nn.Module, capacity: Capacity) -> list[tuple[str, nn.Module]]:
    """Every ``(name, module)`` that ``capacity`` targets, each checked to be able to hold a merged LoRA."""
    targets = []
    for name, module in model.named_modules():
        if not name or not capacity.matches(name):
            continue
        if slot_layer_class(module) is None:
            raise CapacityError(
                f"layer {name!r} matches Capacity.target_modules but is a {type(module).__name__}; fused mode merges "
                "into Linear, Conv1d/2d/3d, Embedding and transformers' Conv1D: narrow target_modules"
            )
        refusal = merge_refusal(module)
        if refusal is not None:
            raise ModeError(
                f"layer {name!r} cannot take a merged LoRA: {refusal}; attach with mode='slots', "
                "or leave the layer out of Capacity.target_modules"
            )
        targets.append((name, module))
    if not targets:
        raise CapacityError(
            f"no layer of the model matches Capacity.target_modules={capacity.target_modules!r}; "
            "give layer names as PEFT does (name suffixes such as 'q_proj', or one regex)"
        )
    return targets


def check_not_shared(model: nn.Module, targets: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse a targeted weight that another module also uses (tied embeddings): merging would change both."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, module in targets:
        names = owners.get(id(module.weight), [])
        if len(names) > 1:
            raise ModeError(
                f"layer {name!r}: its weight is shared with {sorted(set(names) - {name + '.weight'})} "
                "(tied weights); merging would change those too. Attach with mode='slots', or untie the weights"
            )


def _host_copy(tensor: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin_memory)
    copy.copy_(tensor.detach())
    return copy


def attach_fused(model: nn.Module, capacity: Capacity, cache: AdapterCache) -> FusedSlots:
    """Check every target, then take the pristine host copies and return the fused-mode handle."""
    found = fused_targets(model, capacity)
    check_not_shared(model, found)
    devices = {module.weight.device for _, module in found}
    if len(devices) > 1:
        raise CapacityError(
            f"the target layers span devices {sorted(map(str, devices))}; attach supports one device per model"
        )
    capacity.check_layer_ranks(name for name, _ in found)
    layout = SlotLayout.plan(
        ((name, module, slot_layer_class(module).spec(module)) for name, module in found), capacity
    )
    pin_memory = devices.pop().type == "cuda"
    targets = []
    for name, module in found:
        bias = getattr(module, "bias", None) if capacity.lora_bias else None
        targets.append(
            FusedTarget(
                name=name,
                module=module,
                weight_major_in=slot_layer_class(module) in (SlotConv1D, SlotEmbedding),
                pristine_weight=_host_copy(module.weight, pin_memory),
                pristine_bias=None if bias is None else _host_copy(bias, pin_memory),
            )
        )
    _FUSED_MODELS.add(model)
    return FusedSlots(model, capacity, layout, targets, cache, pin_memory)


class FusedSlots:
    """The handle ``attach(..., mode="fused")`` returns: ``load``/``activate``/``unload``/``prefetch`` merge
    adapters into the base weights; ``route``/``blend`` raise :class:`ModeError`.

    ``lock`` serialises the verbs; a serving thread holds it around each forward so that no forward
    reads a half-merged model.
    """

    def __init__(
        self,
        model: nn.Module,
        capacity: Capacity,
        layout: SlotLayout,
        targets: Sequence[FusedTarget],
        cache: AdapterCache,
        pin_memory: bool,
    ) -> None:
        self.model = model
        self.capacity = capacity
        self.layout = layout
        self.targets = {target.name: target for target in targets}
        self.cache = cache
        self.lock = threading.RLock()
        self._pin = pin_memory
        self._staged: dict[int, FusedAdapter] = {}
        self._active = 0
        self._merged: FusedAdapter | None = None
        self._weight_ptrs = {target.name: target.module.weight.data_ptr() for target in targets}
        self._prefetcher: ThreadPoolExecutor | None = None

    @property
    def pristine_nbytes(self) -> int:
        """Host bytes the pristine copy of the targeted weights (and biases) takes."""
        return sum(
            t.numel() * t.element_size()
            for target in self.targets.values()
            for t in (target.pristine_weight, target.pristine_bias)
            if t is not None
        )

    # What an AdapterPool reads (loraswap.pool.PoolSlots): one merged adapter for every row
    @property
    def slot_count(self) -> int:
        return self.capacity.slots

    @property
    def max_blend(self) -> int | None:
        return self.capacity.max_blend

    max_rows = None
    fused = True

    @property
    def loaded(self) -> dict[int, str]:
        """Slot -> source of the adapter staged there (the active one is merged into the weights)."""
        return {slot: adapter.source for slot, adapter in self._staged.items()}

    @property
    def active(self) -> int:
        return self._active

    def packed(self, source: AdapterSource, *, allow_pickle: bool = False) -> FusedAdapter:
        """The adapter in merge form: from the cache, else read, validated, converted and cached."""
        key = cache_key(source)
        fused = self.cache.get(key)
        if fused is None:
            fused = self.pack(load_adapter(source, allow_pickle=allow_pickle))
            self.cache.put(key, fused, keep_alive=source if isinstance(source, Adapter) else None)
        return fused

    def pack(self, adapter: Adapter) -> FusedAdapter:
        """Validate ``adapter`` and convert it to merge form (host memory; no weight is written)."""
        check_saved_base_weights(adapter, lambda name: self.targets[name].pristine_weight, self.targets)
        self.layout.validate(adapter)
        for name, layer in adapter.layers.items():
            if layer.lora_bias is not None and self.targets[name].pristine_bias is None:
                raise CapacityError(
                    f"layer {name!r}: {adapter.source} has a LoRA bias but the base layer has no bias to merge it "
                    "into; attach with mode='slots' to serve this adapter"
                )
        return FusedAdapter(
            {name: self._factors(self.targets[name], layer) for name, layer in adapter.layers.items()},
            adapter.source,
            self.layout,
        )

    def _factors(self, target: FusedTarget, layer: LayerLora) -> LayerFactors:
        rank = layer.rank
        lora_A = layer.lora_A.reshape(rank, -1)
        lora_B = layer.lora_B.reshape(layer.lora_B.shape[0], rank)
        left, right = (lora_A.t(), lora_B.t()) if target.weight_major_in else (lora_B, lora_A)

        def prepared(tensor: torch.Tensor) -> torch.Tensor:
            out = torch.empty(tensor.shape, dtype=target.compute_dtype, pin_memory=self._pin)
            return out.copy_(tensor)

        bias = None if layer.lora_bias is None else prepared(layer.lora_bias)
        magnitude = None if layer.magnitude is None else prepared(layer.magnitude.reshape(-1))
        return LayerFactors(prepared(left), prepared(right), float(layer.scaling), bias, magnitude)

    def load(self, source: AdapterSource, slot: int = 0, *, allow_pickle: bool = False) -> None:
        """Merge ``source`` into the weights (into the active slot), or stage it for ``activate(slot)``."""
        self._check_slot(slot)
        self._check_layout()  # before packing, which reads the targeted weights' dtypes
        self.load_packed(self.packed(source, allow_pickle=allow_pickle), slot)

    def load_packed(self, fused: FusedAdapter, slot: int = 0) -> None:
        """Merge (or stage) an adapter that :meth:`pack` (or :meth:`packed`) prepared: the write half of ``load``."""
        self._check_slot(slot)
        check_packed_for(fused, self.layout)
        with self.lock:
            self._check_layout()
            if slot == self._active:
                self._merge(fused)
            self._staged[slot] = fused

    def staged_in(self, slot: int) -> FusedAdapter | None:
        """The adapter staged in ``slot`` (merged, when ``slot`` is the active one)."""
        return self._staged.get(slot)

    def prefetch(self, source: AdapterSource, *, allow_pickle: bool = False) -> Future:
        """Read, validate and convert ``source`` into the host cache on a background thread."""
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraswap-prefetch")
        return self._prefetcher.submit(self.packed, source, allow_pickle=allow_pickle)

    def activate(self, slot: int) -> None:
        """Merge the adapter staged in ``slot`` (an empty slot restores the base weights)."""
        self._check_slot(slot)
        with self.lock:
            self._check_layout()
            self._merge(self._staged.get(slot))
            self._active = slot

    def unload(self, slot: int = 0) -> None:
        """Empty ``slot``; when it is the active one, the base weights are restored bit for bit."""
        self._check_slot(slot)
        with self.lock:
            self._check_layout()
            if slot == self._active:
                self._merge(None)
            self._staged.pop(slot, None)

    def route(self, ids: Sequence[int], *, per_token: bool = False) -> None:
        raise ModeError(
            "route() is not available in fused mode: the active adapter is merged into the base weights, so every "
            "row uses it; attach with mode='slots' to give rows their own adapters"
        )

    def blend(self, weights: BlendWeights | Sequence[BlendWeights]) -> None:
        raise ModeError(
            "blend() is not available in fused mode: one adapter is merged into the base weights at a time; "
            "attach with mode='slots' to blend adapters"
        )

    def _merge(self, fused: FusedAdapter | None) -> None:
        """Make the weights hold ``W0 + fused`` (``W0`` alone for None); on failure restore the previous state."""
        if fused is self._merged:
            return
        layers = {} if fused is None else fused.layers
        names = [name for name in self.targets if name in layers or self._is_merged(name)]
        touched: list[str] = []
        try:
            for name in names:
                touched.append(name)
                self._write_layer(self.targets[name], layers.get(name))
        except BaseException:
            previous = {} if self._merged is None else self._merged.layers
            for name in touched:
                self._write_layer(self.targets[name], previous.get(name))
            raise
        self._merged = fused

    def _is_merged(self, name: str) -> bool:
        return self._merged is not None and name in self._merged.layers

    @torch.no_grad()
    def _write_layer(self, target: FusedTarget, factors: LayerFactors | None) -> None:
        """Write ``W0 + scaling * left @ right`` (and ``b0 + scaling * bias``) into the layer's own storage."""
        _merge_weight(target, factors)
        if target.pristine_bias is not None:
            _merge_bias(target, factors)

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.capacity.slots:
            raise SlotError(
                f"slot {slot!r} is outside the {self.capacity.slots} slot(s) allocated; use "
                f"0..{self.capacity.slots - 1} or attach with a larger Capacity.slots"
            )

    def _check_layout(self) -> None:
        """Raise when a targeted layer or its weight is no longer the one attach saw (moved, cast, quantized, replaced)."""
        for name, target in self.targets.items():
            module = target.module
            replaced = self.model.get_submodule(name) is not module or quantized_weight(module) is not None
            if replaced or module.weight.data_ptr() != self._weight_ptrs[name]:
                raise LayoutChangedError(
                    f"layer {name!r}: its weight was replaced after attach (the model was moved, cast or quantized); "
                    "call .to()/.half() before loraswap.attach, then attach again on a fresh model"
                )

    def __repr__(self) -> str:
        return (
            f"FusedSlots(layers={len(self.targets)}, slots={self.capacity.slots}, active={self._active}, "
            f"pristine_bytes={self.pristine_nbytes}, loaded={self.loaded})"
        )


def _merge_weight(target: FusedTarget, factors: LayerFactors | None) -> None:
    """``weight = W0 + scaling * left @ right`` in the weight's own storage.

    Full-precision contiguous weights take the product straight into their storage (one ``addmm``,
    no temporary); half-precision ones are computed in float32 and rounded once.
    """
    live = target.module.weight
    base = target.pristine_weight.to(live.device, non_blocking=True)
    if factors is None:
        live.copy_(base)
        return
    left = factors.left.to(live.device, non_blocking=True)
    right = factors.right.to(live.device, non_blocking=True)
    rows = left.shape[0]
    if factors.magnitude is not None:
        merged = torch.addmm(base.reshape(rows, -1).to(target.compute_dtype), left, right, alpha=factors.scaling)
        live.copy_(_dora_rescaled(merged, factors.magnitude.to(live.device), target).view(live.shape))
    elif live.dtype == target.compute_dtype and live.is_contiguous():
        torch.addmm(base.view(rows, -1), left, right, alpha=factors.scaling, out=live.view(rows, -1))
    else:
        merged = torch.addmm(base.reshape(rows, -1).to(target.compute_dtype), left, right, alpha=factors.scaling)
        live.copy_(merged.view(live.shape))
    _check_finite(live, target, "weight")


def _dora_rescaled(merged: torch.Tensor, magnitude: torch.Tensor, target: FusedTarget) -> torch.Tensor:
    """PEFT's DoRA merge: ``(m / ||W0 + delta||) * (W0 + delta)`` per output feature (the columns of a weight stored
    ``[in, out]``), the norm of the unmerged sum, as PEFT's ``merge_safe`` takes it."""
    axis = 0 if target.weight_major_in else 1
    norm = torch.linalg.norm(merged, dim=axis, keepdim=True)
    return merged * (magnitude.view(norm.shape) / norm)


def _merge_bias(target: FusedTarget, factors: LayerFactors | None) -> None:
    """``bias = b0 + scaling * lora_bias`` in the bias's own storage (``b0`` without a LoRA bias)."""
    live = target.module.bias
    base = target.pristine_bias.to(live.device, non_blocking=True)
    if factors is None or factors.bias is None:
        live.copy_(base)
        return
    lora_bias = factors.bias.to(live.device, non_blocking=True)
    live.copy_(torch.add(base.to(target.compute_dtype), lora_bias, alpha=factors.scaling))
    _check_finite(live, target, "bias")


def _check_finite(live: torch.Tensor, target: FusedTarget, what: str) -> None:
    if not all_finite([live]):
        raise NonFiniteError(
            f"layer {target.name!r}: the merged {what} is not finite in {live.dtype} (the adapter overflows it); "
            "lower the adapter's alpha or attach with mode='slots'"
        )
