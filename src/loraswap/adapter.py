"""Reading LoRA checkpoints into a normalised :class:`Adapter`.

An adapter on disk is a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``),
a lone PEFT-keyed ``.safetensors`` file, or a hub id that resolves to one of those: which file is read is
:func:`loraswap.formats.locate.locate`'s answer, the one ``inspect`` gets too. Whatever the
source, the result maps each target layer's module name (as in the base model) to its ``lora_A``,
``lora_B``, scaling and optional bias, with ``rank_pattern``/``alpha_pattern`` and rsLoRA applied.

Safetensors headers are read before any tensor, so a truncated or foreign file is rejected
without being read whole. Pickled ``.bin`` files are only read when the caller passes
``allow_pickle=True``, and then with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from .errors import AdapterFormatError, PickleRefusedError
from .formats.locate import PICKLE, locate
from .formats.lora_keys import (
    PEFT_PREFIX,
    config_rank_mismatch,
    dora_magnitudes_missing,
    group_lora_keys,
    layer_rank_and_alpha,
    lora_scaling,
    metadata_config,
    ranks_disagree,
    read_config,
    split_lora_key,
)
from .formats.safetensors import ReadBuffer, open_safetensors, read_whole_safetensors
from .formats.support import BASE_LAYER_WEIGHT, check_adapter_supported

AdapterSource = Union[str, os.PathLike, "Adapter"]
# (module, role, tensor or safetensors slice) -> the part to keep, or None to keep it whole (tensor parallel)
ShardFn = Callable[[str, str, Any], Union[torch.Tensor, None]]


@dataclass(frozen=True)
class LayerLora:
    """One target layer's LoRA factors, as PEFT stores them.

    ``lora_A`` is ``[r, in]`` (Linear, Conv1D), ``[r, in_channels, *kernel]`` (ConvNd) or
    ``[r, num_embeddings]`` (Embedding); ``lora_B`` is ``[out, r]`` or, for ConvNd,
    ``[out, r // groups, 1, ...]``. The layer adds ``scaling * lora_B(lora_A(x)) (+ scaling * lora_bias)``.

    DoRA: ``magnitude`` is PEFT's ``lora_magnitude_vector`` (one entry per output feature), as read. A slot
    serves it once :func:`loraswap.dora.resolve_dora` has computed ``dora`` (``m / ||W + s*B*A|| - 1`` per
    output feature, for one base weight) and folded ``m / ||W + s*B*A||`` into ``lora_B``.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    lora_bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    dora: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


@dataclass(frozen=True)
class Adapter:
    """A LoRA checkpoint in memory: target module name -> :class:`LayerLora`.

    ``base_weights``: the base weights PEFT saved beside an embedding (or lm_head) LoRA
    (``save_embedding_layers``), by module name; a load checks they equal the model's, since a
    hot-swap cannot follow a resized vocabulary.
    """

    layers: Mapping[str, LayerLora]
    source: str = "<memory>"
    config: Mapping[str, Any] = field(default_factory=dict)
    base_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max((layer.rank for layer in self.layers.values()), default=0)

    @property
    def target_names(self) -> frozenset[str]:
        return frozenset(self.layers)

    @property
    def has_bias(self) -> bool:
        return any(layer.lora_bias is not None for layer in self.layers.values())

    @property
    def has_dora(self) -> bool:
        return any(layer.magnitude is not None or layer.dora is not None for layer in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers.values()
            for t in (layer.lora_A, layer.lora_B, layer.lora_bias, layer.magnitude, layer.dora)
            if t is not None
        )

    def __repr__(self) -> str:
        return f"Adapter({self.source!r}, layers={len(self.layers)}, max_rank={self.max_rank})"


def adapter_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    source: str = "<memory>",
) -> Adapter:
    """Normalise a PEFT-keyed LoRA state dict (with its PEFT config, if any) into an :class:`Adapter`.

    Without a config, a layer's scaling is ``alpha / r`` when the state dict holds a
    ``<module>.alpha`` tensor, else 1.0 (as diffusers assumes for alpha-less files).
    """
    config = dict(config or {})
    check_adapter_supported(state_dict.keys(), config, source)
    use_rslora = bool(config.get("use_rslora", False))
    layers = {}
    for module, roles in group_lora_keys(state_dict.keys(), source).items():
        lora_A = state_dict[roles["lora_A"]]
        lora_B = state_dict[roles["lora_B"]]
        rank = int(lora_A.shape[0]) if lora_A.dim() else 0
        if rank == 0 or lora_B.dim() < 2 or int(lora_B.shape[1]) * _b_groups(lora_A, lora_B) != rank:
            raise ranks_disagree(source, module, lora_A.shape, lora_B.shape)
        layers[module] = LayerLora(
            lora_A=lora_A,
            lora_B=lora_B,
            scaling=_layer_scaling(config, state_dict, roles, module, rank, use_rslora, source),
            lora_bias=state_dict[roles["lora_bias"]] if "lora_bias" in roles else None,
            magnitude=state_dict[roles["magnitude"]] if "magnitude" in roles else None,
        )
    check_dora_complete(layers, config, source)
    base_weights = {
        key.removeprefix(PEFT_PREFIX)[: -len(BASE_LAYER_WEIGHT)]: tensor
        for key, tensor in state_dict.items()
        if key.endswith(BASE_LAYER_WEIGHT)
    }
    return Adapter(layers=layers, source=source, config=config, base_weights=base_weights)


def check_dora_complete(layers: Mapping[str, LayerLora], config: Mapping[str, Any], source: str) -> None:
    """A ``use_dora`` config needs a magnitude vector for every layer (PEFT would use an untrained one otherwise)."""
    if not config.get("use_dora"):
        return
    missing = [name for name, layer in layers.items() if layer.magnitude is None]
    if missing:
        raise dora_magnitudes_missing(source, missing)


def _b_groups(lora_A: torch.Tensor, lora_B: torch.Tensor) -> int:
    """How many groups a conv lora_B splits the rank into (1 for Linear/Embedding)."""
    if lora_B.dim() > 2 and lora_B.shape[1] and lora_A.shape[0] % lora_B.shape[1] == 0:
        return int(lora_A.shape[0] // lora_B.shape[1])
    return 1


def _layer_scaling(config, state_dict, roles, module, rank, use_rslora, source) -> float:
    if "alpha" in roles:
        return lora_scaling(float(state_dict[roles["alpha"]]), rank, use_rslora)
    if not config:
        return 1.0
    config_rank, alpha = layer_rank_and_alpha(config, module)
    if config_rank != rank:
        raise config_rank_mismatch(source, module, rank, config_rank)
    return lora_scaling(alpha, rank, use_rslora)


def read_safetensors(
    path: Path, config: Mapping[str, Any] | None, shard: ShardFn | None = None, scratch: ReadBuffer | None = None
) -> Adapter:
    """With ``shard``, each tensor is read through a safetensors slice: only the part ``shard`` keeps.
    Without, the whole file is read at once (:func:`read_whole_safetensors`, into ``scratch`` when given)."""
    tensors, metadata = read_whole_safetensors(path, scratch) if shard is None else (None, {})
    if tensors is not None:
        if config is None:
            config = metadata_config(metadata, path)
        return adapter_from_state_dict(tensors, config, source=str(path))  # checks the keys before any tensor
    with open_safetensors(path) as handle:
        keys = list(handle.keys())
        if config is None:
            config = metadata_config(handle.metadata() or {}, path)
        check_adapter_supported(keys, config, str(path))  # refuse unsupported, foreign or incomplete files
        group_lora_keys(keys, str(path))  # before reading tensors
        state_dict = {key: _read_part(key, handle.get_slice, shard, handle.get_tensor) for key in keys}
    return adapter_from_state_dict(state_dict, config, source=str(path))


def _read_part(key: str, sliceable: Callable[[str], Any], shard: ShardFn | None, whole: Callable[[str], torch.Tensor]):
    """The part of tensor ``key`` that ``shard`` keeps (read from ``sliceable(key)``), else ``whole(key)``."""
    if shard is not None:
        module, role = split_lora_key(key)
        part = shard(module, role, sliceable(key))
        if part is not None:
            return part
    return whole(key)


def read_pickle(
    path: Path, config: Mapping[str, Any] | None, allow_pickle: bool, shard: ShardFn | None = None
) -> Adapter:
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path} is a pickled checkpoint; loraswap unpickles nothing unless asked: "
            "pass allow_pickle=True (it then uses torch.load(weights_only=True)) or convert it to safetensors"
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe pickles
        raise AdapterFormatError(f"{path}: cannot be read with torch.load(weights_only=True) ({err})") from err
    if not isinstance(state_dict, Mapping):
        raise AdapterFormatError(f"{path}: holds a {type(state_dict).__name__}, not a state dict")
    state_dict = {key: _read_part(key, state_dict.get, shard, state_dict.get) for key in state_dict}
    return adapter_from_state_dict(state_dict, config, source=str(path))


def load_adapter(
    source: AdapterSource,
    *,
    allow_pickle: bool = False,
    revision: str | None = None,
    shard: ShardFn | None = None,
    scratch: ReadBuffer | None = None,
) -> Adapter:
    """Read a LoRA adapter from a PEFT directory, a ``.safetensors`` file or a hub id.

    ``shard`` (tensor parallel) keeps part of each tensor; from safetensors only that part is read.
    ``scratch``: read a safetensors file into this reused buffer (the adapter's tensors are then views of it).
    """
    if isinstance(source, Adapter):
        return source
    located = locate(source, revision)
    config = read_config(located.config) if located.config is not None else None
    if located.kind == PICKLE:
        return read_pickle(located.weights, config, allow_pickle, shard)
    return read_safetensors(located.weights, config, shard, scratch)
