"""What the compiled graph must be able to hold: target layers, rank, slots, routable rows."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

from torch import nn

from .adapter import Adapter, AdapterSource, load_adapter
from .errors import CapacityError, PickleRefusedError
from .formats.lora_keys import get_pattern_key
from .info import AdapterInfo, inspect

TargetModules = Union[str, Sequence[str]]

DEFAULT_MAX_BATCH = 1024


def target_matches(target_modules: TargetModules, module_name: str) -> bool:
    """PEFT's meaning: one regex string that must match the whole name, or a list of name suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return any(module_name == target or module_name.endswith("." + target) for target in target_modules)


@dataclass(frozen=True)
class Capacity:
    """The shapes ``attach`` allocates, fixed for the life of the compiled graph.

    ``max_rank``: the rank every slot buffer is padded to. ``layer_ranks`` (module name or
    rank-pattern key -> rank, matched as PEFT matches ``rank_pattern``) sizes layers individually,
    e.g. ``Capacity(max_rank=8, target_modules=[...], layer_ranks={"down_proj": 64})``; a layer's
    cost per forward grows with its rank, so padding only where needed is cheaper. ``slots``: how
    many adapters are resident at once. ``max_batch``: how many rows (or packed tokens) the
    routing table can address. ``lora_bias``: allocate room for LoRA biases (PEFT's ``lora_bias=True``).
    ``dora``: allocate a DoRA vector per slot and layer (``[slots, out]``, see :mod:`loraswap.dora`) so that
    DoRA adapters load; each forward then adds one per-row vector times the base output per layer.
    ``max_blend``: how many slots one row may mix (default 1: every row reads one adapter, at one
    adapter's cost however many slots are resident). Each row then costs ``max_blend`` adapters'
    LoRA compute: slot layers gather each row's own slots instead of computing every slot for every
    row. ``max_blend=slots`` computes every slot densely instead, the one capacity that also allows
    per-token routing (packed sequences), at a cost that grows with ``slots``.
    """

    max_rank: int
    target_modules: TargetModules
    slots: int = 1
    max_batch: int = DEFAULT_MAX_BATCH
    lora_bias: bool = False
    layer_ranks: Mapping[str, int] = field(default_factory=dict)
    max_blend: int = 1
    dora: bool = False

    def __post_init__(self) -> None:
        if self.max_rank < 1:
            raise CapacityError(f"Capacity.max_rank is {self.max_rank}; it must be at least 1")
        if self.slots < 1:
            raise CapacityError(f"Capacity.slots is {self.slots}; it must be at least 1")
        if self.max_batch < 1:
            raise CapacityError(f"Capacity.max_batch is {self.max_batch}; it must be at least 1")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise CapacityError("Capacity.target_modules is empty; name at least one layer")
        object.__setattr__(self, "layer_ranks", dict(self.layer_ranks))
        if not isinstance(self.max_blend, int) or not 1 <= self.max_blend <= self.slots:
            raise CapacityError(
                f"Capacity.max_blend is {self.max_blend}; it must lie in 1..slots ({self.slots})"
            )
        for key, rank in self.layer_ranks.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise CapacityError(f"Capacity.layer_ranks[{key!r}] is {rank!r}; a layer's rank must be an int >= 1")

    def matches(self, module_name: str) -> bool:
        return target_matches(self.target_modules, module_name)

    def check_layer_ranks(self, target_names: Iterable[str]) -> None:
        """Raise when a ``layer_ranks`` key sizes none of the targeted layers (a typo would silently pad to ``max_rank``)."""
        names = list(target_names)
        for key in self.layer_ranks:
            if key not in names and not any(get_pattern_key([key], name) for name in names):
                raise CapacityError(
                    f"Capacity.layer_ranks key {key!r} matches none of the {len(names)} targeted layers "
                    f"(e.g. {names[0]!r}); use a module name or a name-suffix pattern as in PEFT's rank_pattern"
                )

    def rank_for(self, module_name: str) -> int:
        """The padded rank of one layer: its ``layer_ranks`` entry, else ``max_rank``."""
        if module_name in self.layer_ranks:
            return self.layer_ranks[module_name]
        key = get_pattern_key(self.layer_ranks, module_name)
        return self.layer_ranks[key] if key is not None else self.max_rank

    @classmethod
    def for_adapters(
        cls,
        adapters: Iterable[AdapterSource | AdapterInfo],
        *,
        model: nn.Module | None = None,
        slots: int = 1,
        per_layer_rank: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_blend: int = 1,
        allow_pickle: bool = False,
    ) -> Capacity:
        """The smallest capacity that holds every given adapter: union of targets, maximum rank.

        Files are described from their safetensors headers and configs (:func:`loraswap.inspect`),
        without reading a tensor, so planning a catalogue of thousands of adapters takes seconds;
        an adapter the header reading cannot take as PEFT LoRA is read in full, so that it raises
        the same error as :func:`loraswap.load_adapter`. With ``per_layer_rank=True`` each layer
        is sized to the largest rank any adapter gives it. With ``model``, every target is checked
        to exist in it. ``allow_pickle`` as in :func:`loraswap.load_adapter`.
        """
        described = [_ranks_and_bias(adapter, allow_pickle) for adapter in adapters]
        if not described:
            raise CapacityError("Capacity.for_adapters needs at least one adapter")
        layer_ranks = _largest_ranks(ranks for ranks, _, _ in described)
        if model is not None:
            check_targets_exist(layer_ranks, model)
        return cls(
            max_rank=max(layer_ranks.values()),
            target_modules=tuple(sorted(layer_ranks)),
            slots=slots,
            max_batch=max_batch,
            max_blend=max_blend,
            lora_bias=any(has_bias for _, has_bias, _ in described),
            dora=any(has_dora for _, _, has_dora in described),
            layer_ranks=layer_ranks if per_layer_rank else {},
        )


def union_of_ranks(adapters: Iterable[Adapter]) -> dict[str, int]:
    """Module name -> the largest rank any adapter gives that module."""
    return _largest_ranks(_ranks_of(adapter) for adapter in adapters)


def _largest_ranks(rank_maps: Iterable[Mapping[str, int]]) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for rank_map in rank_maps:
        for name, rank in rank_map.items():
            ranks[name] = max(ranks.get(name, 0), rank)
    return ranks


def _ranks_and_bias(adapter: AdapterSource | AdapterInfo, allow_pickle: bool) -> tuple[dict[str, int], bool, bool]:
    """``({module name: rank}, has a LoRA bias, is DoRA)`` of one adapter, from its header when it is a safetensors
    file."""
    if isinstance(adapter, Adapter):
        return _ranks_of(adapter), adapter.has_bias, adapter.has_dora
    source = adapter.source if isinstance(adapter, AdapterInfo) else adapter
    try:
        info = adapter if isinstance(adapter, AdapterInfo) else inspect(adapter)
    except PickleRefusedError:
        if not allow_pickle:
            raise
        info = None
    if info is not None and info.is_peft and not info.unsupported:
        return info.layer_ranks, info.has_bias, info.has_dora
    loaded = load_adapter(source, allow_pickle=allow_pickle)  # raises what a load would (a refused feature, a format)
    return _ranks_of(loaded), loaded.has_bias, loaded.has_dora


def _ranks_of(adapter: Adapter) -> dict[str, int]:
    return {name: layer.rank for name, layer in adapter.layers.items()}


def check_targets_exist(module_names: Iterable[str], model: nn.Module, where: str = "the model") -> None:
    present = {name for name, _ in model.named_modules()}
    missing = sorted(set(module_names) - present)
    if missing:
        raise CapacityError(
            f"the adapters target {len(missing)} layer(s) {where} does not have, e.g. {missing[0]!r}; "
            "were they trained on another base model?"
        )
