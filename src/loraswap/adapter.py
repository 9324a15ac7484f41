"""Reading LoRA checkpoints into a normalised :class:`Adapter`.

An adapter on disk is a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``),
a lone PEFT-keyed ``.safetensors`` file, or a hub id that resolves to one of those. Whatever the
source, the result maps each target layer's module name (as in the base model) to its ``lora_A``,
``lora_B``, scaling and optional bias, with ``rank_pattern``/``alpha_pattern`` and rsLoRA applied.

Safetensors headers are read before any tensor, so a truncated or foreign file is rejected
without being read whole. Pickled ``.bin`` files are only read when the caller passes
``allow_pickle=True``, and then with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError, safe_open

from .errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    PickleRefusedError,
)
from .support import BASE_LAYER_WEIGHT, check_config_fields, refuse_unsupported

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# PEFT's key suffix -> (which tensor, is it an embedding layer)
_KEY_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_B.bias": "lora_bias",
    ".lora_embedding_A": "lora_A",
    ".lora_embedding_B": "lora_B",
    ".lora_magnitude_vector": "magnitude",  # DoRA (PEFT's saved key drops the adapter name and ".weight")
}

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


def get_pattern_key(pattern_keys, module_name: str) -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key that matches ``module_name``, as PEFT matches them.

    A key matches when it equals the name or a dot-separated suffix of it, read as a regex.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def layer_rank_and_alpha(config: Mapping[str, Any], module_name: str) -> tuple[int, float]:
    """The rank and alpha that a PEFT config gives ``module_name`` (rank_pattern/alpha_pattern applied)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = get_pattern_key(rank_pattern, module_name)
    alpha_key = get_pattern_key(alpha_pattern, module_name)
    rank = rank_pattern[r_key] if r_key is not None else config.get("r", 8)
    alpha = alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    return int(rank), float(alpha)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def check_adapter_supported(keys, config: Mapping[str, Any] | None, where: str) -> None:
    """Raise before any tensor is read: :class:`AdapterFormatError` for a damaged config, then
    :class:`UnsupportedAdapterError` for a feature the config or the key names show (DoRA, IA3, PiSSA, ...)."""
    if config:
        check_config_fields(config, where)
    refuse_unsupported(keys, [config] if config else [], where)


def split_lora_key(key: str) -> tuple[str, str]:
    """``'base_model.model.x.q_proj.lora_A.weight'`` -> ``('x.q_proj', 'lora_A')``."""
    name = key.removeprefix(PEFT_PREFIX)
    for suffix, role in _KEY_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    if name.endswith(".alpha"):
        return name[: -len(".alpha")], "alpha"
    if name.endswith(BASE_LAYER_WEIGHT):
        return name[: -len(BASE_LAYER_WEIGHT)], "base_weight"
    raise AdapterFormatError(
        f"key {key!r} is not a PEFT LoRA key (expected '<module>.lora_A.weight', '<module>.lora_B.weight', "
        "'<module>.lora_embedding_A', ...); kohya/A1111, xlabs and diffusers pipeline files load through "
        "loraswap.diffusers.attach(pipe, [file]), other files need converting to PEFT format first"
    )


def check_pairs_complete(modules: Mapping[str, Mapping[str, str]], source: str) -> None:
    """Raise :class:`AdapterFormatError` for a layer that has ``lora_A`` without ``lora_B`` or the reverse."""
    for module, roles in modules.items():
        missing = {"lora_A", "lora_B"} - roles.keys()
        if missing:
            raise AdapterFormatError(
                f"{source}: layer {module!r} has no {' or '.join(sorted(missing))} tensor; "
                "the file is incomplete or not a LoRA adapter"
            )


def group_lora_keys(keys, source: str) -> dict[str, dict[str, str]]:
    """Module name -> {role: key}, checking every module has both A and B."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        module, role = split_lora_key(key)
        if role != "base_weight":
            modules.setdefault(module, {})[role] = key
    check_pairs_complete(modules, source)
    if not modules:
        raise AdapterFormatError(f"{source}: no LoRA tensors found; is this a LoRA adapter?")
    return modules


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
            raise AdapterFormatError(
                f"{source}: layer {module!r} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}, "
                "whose ranks disagree; the file is corrupt"
            )
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
        raise AdapterFormatError(
            f"{source}: the config says use_dora=True but layer {missing[0]!r} has no lora_magnitude_vector "
            f"({len(missing)} layer(s) lack one); the file is incomplete: re-save the DoRA adapter with PEFT"
        )


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
        raise AdapterFormatError(
            f"{source}: layer {module!r} has rank {rank} in its tensors but {config_rank} in the config "
            "(r / rank_pattern); the config does not belong to these weights"
        )
    return lora_scaling(alpha, rank, use_rslora)


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"{path}: cannot read the adapter config ({err})") from err
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{path}: invalid JSON at line {err.lineno} ({err.msg}); fix or re-save it") from err
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: the adapter config is not a JSON object")
    return config


def open_safetensors(path: Path):
    """``safe_open`` whose header errors (truncated, corrupt) become :class:`AdapterFormatError`."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise AdapterFormatError(f"{path}: not a valid safetensors file ({err}); re-download or re-save it") from err


def read_safetensors(
    path: Path, config: Mapping[str, Any] | None, shard: ShardFn | None = None, scratch: ReadBuffer | None = None
) -> Adapter:
    """With ``shard``, each tensor is read through a safetensors slice: only the part ``shard`` keeps.
    Without, the whole file is read at once (:func:`read_whole_safetensors`, into ``scratch`` when given)."""
    tensors, metadata = read_whole_safetensors(path, scratch) if shard is None else (None, {})
    if tensors is not None:
        if config is None:
            config = _config_from_metadata(metadata, path)
        return adapter_from_state_dict(tensors, config, source=str(path))  # checks the keys before any tensor
    with open_safetensors(path) as handle:
        keys = list(handle.keys())
        if config is None:
            config = _config_from_metadata(handle.metadata() or {}, path)
        check_adapter_supported(keys, config, str(path))  # refuse unsupported, foreign or incomplete files
        group_lora_keys(keys, str(path))  # before reading tensors
        state_dict = {key: _read_part(key, handle.get_slice, shard, handle.get_tensor) for key in keys}
    return adapter_from_state_dict(state_dict, config, source=str(path))


class ReadBuffer:
    """One host buffer that whole-file reads reuse: an adapter read into it holds views of it, valid until the next
    read into it (the caller serialises reads and drops the adapter before the next one).

    A fresh buffer per read costs a page fault per 4 KiB page whenever the allocator maps new memory for it:
    measured here, reading a 16 MiB adapter while the previous one is still alive takes 3.3 ms into a fresh
    buffer, 2.3 ms into this one.
    """

    def __init__(self) -> None:
        self._data = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of the buffer (grown, never shrunk)."""
        if self._data.numel() < nbytes:
            self._data = torch.empty(nbytes, dtype=torch.uint8)
        return self._data[:nbytes]


def read_whole_safetensors(
    path: Path, scratch: ReadBuffer | None = None
) -> tuple[dict[str, torch.Tensor] | None, Mapping[str, str]]:
    """Every tensor of a safetensors file as a view of one buffer filled by one ``readinto``, and the metadata.

    A slot pack then copies each tensor once more, straight into its padded place. Measured here for
    a 16 MiB adapter of 112 tensors: one ``readinto`` 2.5-6 ms; ``safe_open(...).get_tensor`` per
    tensor or copying out of a memory map (a page fault per 4 KiB page) about 10 ms. Returns
    ``(None, metadata)`` when a dtype has no torch equivalent or an offset is not aligned to its
    element size: the caller then reads with ``safe_open``.
    """
    from .info import read_safetensors_header  # info reads headers with this module's helpers

    header = read_safetensors_header(path)
    nbytes = header.file_bytes - header.data_start
    data = scratch.take(nbytes) if scratch is not None else torch.empty(nbytes, dtype=torch.uint8)
    views = _tensor_views(data, header.tensors)
    if views is None:
        return None, header.metadata
    try:
        with open(path, "rb", buffering=0) as handle:
            handle.seek(header.data_start)
            read = handle.readinto(memoryview(data.numpy()))
    except OSError as err:
        raise AdapterFormatError(f"{path}: cannot be read ({err})") from err
    if read != data.numel():
        raise AdapterFormatError(f"{path}: {read} of {data.numel()} tensor bytes could be read; the file is truncated")
    return views, header.metadata


def _tensor_views(data: torch.Tensor, tensors: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """Each header entry as a view of ``data`` (the file's tensor bytes, which the entries tile: the header check
    ensures it); None when a dtype has no torch equivalent or an offset is not aligned to its element size.

    One dtype (the usual file) takes one ``split`` and one ``view`` per tensor instead of a slice and two views."""
    from .info import torch_dtype  # info reads headers with this module's helpers

    dtypes = {entry.dtype for entry in tensors.values()}
    dtype = torch_dtype(next(iter(dtypes))) if len(dtypes) == 1 else None
    if dtype is not None and data.numel() % dtype.itemsize == 0:
        ordered = sorted(tensors.items(), key=lambda item: item[1].begin)
        parts = data.view(dtype).split_with_sizes([entry.numel for _, entry in ordered])
        return {key: part.view(entry.shape) for (key, entry), part in zip(ordered, parts)}
    views = {}
    for key, entry in tensors.items():
        dtype = torch_dtype(entry.dtype)
        if dtype is None or entry.begin % dtype.itemsize:
            return None
        views[key] = data[entry.begin : entry.end].view(dtype).view(entry.shape)
    return views


def _read_part(key: str, sliceable: Callable[[str], Any], shard: ShardFn | None, whole: Callable[[str], torch.Tensor]):
    """The part of tensor ``key`` that ``shard`` keeps (read from ``sliceable(key)``), else ``whole(key)``."""
    if shard is not None:
        module, role = split_lora_key(key)
        part = shard(module, role, sliceable(key))
        if part is not None:
            return part
    return whole(key)


def _config_from_metadata(metadata: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    """diffusers writes the LoraConfig into the safetensors header as ``lora_adapter_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{path}: invalid lora_adapter_metadata in the header ({err.msg})") from err
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: lora_adapter_metadata in the header is not a JSON object")
    return config


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


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local path, or the local snapshot of a hub id (offline from the cache when the hub is unreachable)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = os.fspath(source)
    if HUB_ID.match(text):
        return download_from_hub(text, revision=revision)
    raise AdapterNotFoundError(
        f"{text}: no such file or directory; pass a PEFT adapter directory, a .safetensors file or a hub id"
    )


def download_from_hub(
    repo_id: str,
    *,
    filename: str | None = None,
    allow_patterns: Sequence[str] = (CONFIG_NAME, "*.safetensors", PICKLE_NAME),
    **hub_kwargs: Any,
) -> Path:
    """The local copy of ``filename`` in ``repo_id`` (``hf_hub_download``), else of the repo's files matching
    ``allow_patterns`` (``snapshot_download``); ``hub_kwargs`` (revision, subfolder, token, ...) go to huggingface_hub.
    Offline (``HF_HUB_OFFLINE=1``) it reads the local HF cache only."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, **hub_kwargs))
        return Path(snapshot_download(repo_id, allow_patterns=list(allow_patterns), **hub_kwargs))
    except Exception as err:  # huggingface_hub raises a family of HTTP, offline and cache errors
        raise AdapterNotFoundError(
            f"{repo_id}: not a local path and not resolvable as a hub id ({type(err).__name__}: {err}); "
            "download it first, or check the name and HF_HUB_OFFLINE / HF_HOME"
        ) from err


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
    path = resolve_source(source, revision)
    if path.is_dir():
        config = read_config(path / CONFIG_NAME) if (path / CONFIG_NAME).exists() else None
        if (path / SAFETENSORS_NAME).exists():
            return read_safetensors(path / SAFETENSORS_NAME, config, shard, scratch)
        if (path / PICKLE_NAME).exists():
            return read_pickle(path / PICKLE_NAME, config, allow_pickle, shard)
        raise AdapterNotFoundError(f"{path}: holds neither {SAFETENSORS_NAME} nor {PICKLE_NAME}")
    if path.suffix == ".safetensors":
        return read_safetensors(path, None, shard, scratch)
    if path.suffix in {".bin", ".pt", ".pth"}:
        return read_pickle(path, None, allow_pickle, shard)
    raise AdapterFormatError(f"{path}: unknown adapter file type {path.suffix!r}; expected .safetensors or a directory")
