"""``loraswap.inspect``: what a LoRA checkpoint holds, from its safetensors header and config alone.

A safetensors file starts with an 8-byte length and a JSON header that names every tensor's dtype,
shape and byte range. That is enough to tell the format (PEFT, diffusers, kohya/A1111), the rank of
every layer, the dtypes and the parameter bytes, so inspecting a multi-gigabyte file reads a few
kilobytes. The only tensor bytes ever read are per-layer ``alpha`` scalars (kohya and some diffusers
files keep alpha there, not in a config): a few bytes each. Nothing is unpickled, nothing is mmapped.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from .adapter import (
    CONFIG_NAME,
    PEFT_PREFIX,
    PICKLE_NAME,
    SAFETENSORS_NAME,
    check_pairs_complete,
    layer_rank_and_alpha,
    lora_scaling,
    read_config,
    resolve_source,
)
from .errors import AdapterFormatError, AdapterNotFoundError, PickleRefusedError
from .support import check_config_fields, find_unsupported, key_feature, names_of, refuse_unsupported

DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit

FORMAT_PEFT_DIR = "peft-dir"
FORMAT_PEFT_FILE = "peft-safetensors"
FORMAT_DIFFUSERS = "diffusers"
FORMAT_KOHYA = "kohya"
FORMAT_XLABS = "xlabs"

# safetensors dtype name -> (bytes per element, torch dtype for decoding alpha scalars)
_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
    "F8_E4M3": (1, None),
    "F8_E5M2": (1, None),
    "U16": (2, None),
    "U32": (4, None),
    "U64": (8, None),
}

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # what a load accepts for LoRA weights



def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name (None where torch has none loraswap reads)."""
    return _DTYPES[name][1]


# Key suffix -> role, per key family. Longer suffixes first where one ends another.
_PEFT_SUFFIXES = (
    (".lora_A.weight", "lora_A"),
    (".lora_B.weight", "lora_B"),
    (".lora_B.bias", "lora_bias"),
    (".lora_embedding_A", "lora_A"),
    (".lora_embedding_B", "lora_B"),
    (".lora_magnitude_vector", "magnitude"),  # DoRA
    (".base_layer.weight", "base_weight"),
)
_KOHYA_SUFFIXES = (
    (".lora_down.weight", "lora_A"),
    (".lora_up.weight", "lora_B"),
)
# XLabs Flux files: double_blocks.<i>.processor.qkv_lora1.down.weight (diffusers splits qkv into q, k, v)
_XLABS_SUFFIXES = (
    (".down.weight", "lora_A"),
    (".up.weight", "lora_B"),
)
_LEGACY_DIFFUSERS_SUFFIXES = (
    (".lora_linear_layer.down.weight", "lora_A"),
    (".lora_linear_layer.up.weight", "lora_B"),
    (".lora.down.weight", "lora_A"),
    (".lora.up.weight", "lora_B"),
    ("_lora.down.weight", "lora_A"),
    ("_lora.up.weight", "lora_B"),
)
_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_te_": "text_encoder",
    "lora_transformer_": "transformer",
}
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the safetensors header declares it."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]
    data_start: int
    file_bytes: int


@dataclass(frozen=True)
class LayerInfo:
    """One target layer: its rank, alpha and scaling (``None`` when the file does not say) and tensor shapes."""

    rank: int
    alpha: float | None
    scaling: float
    lora_A_shape: tuple[int, ...]
    lora_B_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None
    numel: int
    magnitude_shape: tuple[int, ...] | None = None  # DoRA's lora_magnitude_vector


@dataclass(frozen=True)
class AdapterInfo:
    """What a LoRA checkpoint holds, read without loading its tensors.

    ``layers`` maps each target module name, as :func:`loraswap.load_adapter` names it (PEFT's
    ``base_model.model.`` prefix removed; diffusers and kohya files keep their own names), to its
    :class:`LayerInfo`. ``unsupported`` lists features a hot-swap cannot take (DoRA, LoHa, ...);
    such an adapter is still described, and :func:`loraswap.plan.plan` reports why it cannot fit.
    """

    source: str
    format: str
    weights_file: str
    layers: Mapping[str, LayerInfo]
    dtypes: tuple[str, ...]
    parameter_bytes: int
    file_bytes: int
    use_rslora: bool
    target_modules: tuple[str, ...]
    components: tuple[str, ...] = ()
    unsupported: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((layer.rank for layer in self.layers.values()), default=0)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({layer.rank for layer in self.layers.values()}))

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(sorted({layer.alpha for layer in self.layers.values() if layer.alpha is not None}))

    @property
    def scalings(self) -> tuple[float, ...]:
        return tuple(sorted({layer.scaling for layer in self.layers.values()}))

    @property
    def layer_ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    @property
    def has_bias(self) -> bool:
        return any(layer.bias_shape is not None for layer in self.layers.values())

    @property
    def has_dora(self) -> bool:
        return any(layer.magnitude_shape is not None for layer in self.layers.values())

    @property
    def parameters(self) -> int:
        return sum(layer.numel for layer in self.layers.values())

    @property
    def is_peft(self) -> bool:
        return self.format in (FORMAT_PEFT_DIR, FORMAT_PEFT_FILE)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: every field plus the derived rank, ranks, alphas, scalings and parameter count."""
        result = asdict(self)
        result["layers"] = {name: asdict(layer) for name, layer in self.layers.items()}
        result.update(
            rank=self.rank,
            ranks=list(self.ranks),
            alphas=list(self.alphas),
            scalings=list(self.scalings),
            has_bias=self.has_bias,
            has_dora=self.has_dora,
            parameters=self.parameters,
        )
        return result


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors header; reads the header bytes only."""
    try:
        file_bytes = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise AdapterFormatError(f"{path}: {file_bytes} bytes is too short for a safetensors file")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(MAX_HEADER_BYTES, file_bytes - 8):
                raise AdapterFormatError(
                    f"{path}: declares a {header_bytes}-byte header but the file holds {file_bytes} bytes; "
                    "it is truncated or not a safetensors file"
                )
            raw = handle.read(header_bytes)
    except OSError as err:
        raise AdapterFormatError(f"{path}: cannot be read ({err})") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise AdapterFormatError(f"{path}: the safetensors header is not valid JSON; the file is corrupt") from err
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{path}: the safetensors __metadata__ is not an object of strings; it is corrupt")
    tensors = {key: _tensor_entry(path, key, value) for key, value in header.items()}
    data_start = 8 + header_bytes
    declared = _check_contiguous(path, tensors)
    if data_start + declared != file_bytes:
        raise AdapterFormatError(
            f"{path}: the header declares {declared} bytes of tensors but {file_bytes - data_start} follow; "
            "the file is truncated or damaged: re-download or re-save it"
        )
    return SafetensorsHeader(path, tensors, metadata, data_start, file_bytes)


def _check_contiguous(path: Path, tensors: Mapping[str, TensorEntry]) -> int:
    """The data bytes the tensors cover, which must tile ``[0, end)`` without gap or overlap (as safetensors writes)."""
    end = 0
    for key, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != end:
            raise AdapterFormatError(
                f"{path}: tensor {key!r} starts at data byte {entry.begin}, expected {end}: the header's offsets "
                "overlap or leave gaps; the file is corrupt"
            )
        end = entry.end
    return end


def _tensor_entry(path: Path, key: str, value: Any) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = value["dtype"], tuple(value["shape"]), value["data_offsets"]
        itemsize = _DTYPES[dtype][0]
        numbers = (*shape, begin, end)
        valid = set(map(type, numbers)) == {int} and min(numbers) >= 0  # JSON true/false are bools, not ints
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid or end - begin != math.prod(shape) * itemsize:
        raise AdapterFormatError(f"{path}: header entry {key!r} = {value!r} is not a valid safetensors tensor entry")
    return TensorEntry(dtype, shape, begin, end)


def _read_scalar(header: SafetensorsHeader, key: str) -> float:
    """The value of a one-element tensor (a LoRA alpha), read from its few bytes."""
    entry = header.tensors[key]
    torch_dtype = _DTYPES[entry.dtype][1]
    if entry.numel != 1 or torch_dtype is None:
        raise AdapterFormatError(
            f"{header.path}: {key!r} should hold one alpha value but is {entry.dtype}{list(entry.shape)}"
        )
    with open(header.path, "rb") as handle:
        handle.seek(header.data_start + entry.begin)
        raw = handle.read(entry.end - entry.begin)
    return float(torch.frombuffer(bytearray(raw), dtype=torch_dtype)[0])


def detect_format(keys) -> str | None:
    """``kohya``, ``xlabs``, ``diffusers`` or ``peft-safetensors`` from the key names; None for no LoRA keys at all."""
    keys = list(keys)
    if any(key.startswith(tuple(_KOHYA_PREFIXES)) or key.endswith(".lora_down.weight") for key in keys):
        return FORMAT_KOHYA
    if any(".processor." in key and key.endswith(".down.weight") for key in keys):
        return FORMAT_XLABS
    if any(key.endswith(suffix) for key in keys for suffix, _ in _LEGACY_DIFFUSERS_SUFFIXES):
        return FORMAT_DIFFUSERS
    peft_keys = [key for key in keys if _split(key, _PEFT_SUFFIXES)[1] in ("lora_A", "lora_B")]
    if not peft_keys:
        return None
    if any(key.split(".", 1)[0] in DIFFUSERS_COMPONENTS for key in peft_keys):
        return FORMAT_DIFFUSERS
    return FORMAT_PEFT_FILE


def _split(key: str, suffixes) -> tuple[str, str | None]:
    for suffix, role in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    return key, None


def _component(module: str, file_format: str) -> str | None:
    if file_format == FORMAT_KOHYA:
        return next((name for prefix, name in _KOHYA_PREFIXES.items() if module.startswith(prefix)), None)
    if file_format == FORMAT_XLABS:
        return "transformer"
    if file_format == FORMAT_DIFFUSERS:
        first = module.split(".", 1)[0]
        return first if first in DIFFUSERS_COMPONENTS else None
    return None


def _module_kind(module: str, file_format: str) -> str:
    """The short layer name a target list would use: ``q_proj``, ``to_out.0``, kohya's ``attn1_to_q``."""
    if file_format == FORMAT_KOHYA:
        return re.split(r"_\d+_", module)[-1]
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _group_keys(header: SafetensorsHeader, file_format: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Module name -> {role: key}, and a note on keys that are neither LoRA tensors nor a known feature's."""
    suffixes = {
        FORMAT_KOHYA: _KOHYA_SUFFIXES + _LEGACY_DIFFUSERS_SUFFIXES,
        FORMAT_XLABS: _XLABS_SUFFIXES,
        FORMAT_DIFFUSERS: _LEGACY_DIFFUSERS_SUFFIXES + _PEFT_SUFFIXES,
    }.get(file_format, _PEFT_SUFFIXES)
    modules: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in header.tensors:
        if key_feature(key) is not None:
            continue  # named by support.find_unsupported
        module, role = _split(key, suffixes)
        if role is None:
            unknown.append(key)
        elif role != "base_weight":
            if file_format in (FORMAT_PEFT_FILE, FORMAT_PEFT_DIR) and module.startswith(PEFT_PREFIX):
                module = module[len(PEFT_PREFIX) :]
            modules.setdefault(module, {})[role] = key
    notes = [f"{len(unknown)} key(s) that are not LoRA tensors, e.g. {unknown[0]!r}"] if unknown else []
    lora_modules = {name: roles for name, roles in modules.items() if roles.keys() & {"lora_A", "lora_B"}}
    check_pairs_complete(lora_modules, str(header.path))
    return lora_modules, notes


def component_configs(config: Mapping[str, Any] | None, metadata: Mapping[str, str], path: Path) -> dict[str, dict]:
    """Component (``""`` for a whole-model PEFT file) -> its LoraConfig dict, from adapter_config.json or
    diffusers' ``lora_adapter_metadata`` header entry (flat keys like ``unet.r``)."""
    if config is not None:
        return {"": dict(config)}
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{path}: invalid lora_adapter_metadata in the header ({err.msg})") from err
    if not isinstance(packed, dict):
        raise AdapterFormatError(f"{path}: lora_adapter_metadata in the header is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, option = key.partition(".")
        if component in DIFFUSERS_COMPONENTS and option:
            configs.setdefault(component, {})[option] = value
        else:
            configs.setdefault("", {})[key] = value
    return configs


def _layer_info(
    header: SafetensorsHeader,
    module: str,
    roles: Mapping[str, str],
    config: Mapping[str, Any] | None,
    config_name: str,
) -> LayerInfo:
    lora_A = header.tensors[roles["lora_A"]]
    lora_B = header.tensors[roles["lora_B"]]
    bias = header.tensors[roles["lora_bias"]] if "lora_bias" in roles else None
    magnitude = header.tensors[roles["magnitude"]] if "magnitude" in roles else None
    rank = lora_A.shape[0] if lora_A.shape else 0
    b_rank = lora_B.shape[1] if len(lora_B.shape) > 1 else 0
    if rank == 0 or b_rank == 0 or rank % b_rank:
        raise AdapterFormatError(
            f"{header.path}: layer {module!r} has lora_A {list(lora_A.shape)} and lora_B {list(lora_B.shape)}, "
            "whose ranks disagree; the file is corrupt"
        )
    use_rslora = bool(config and config.get("use_rslora", False))
    if "alpha" in roles:
        alpha: float | None = _read_scalar(header, roles["alpha"])
    elif config:
        config_rank, alpha = layer_rank_and_alpha(config, config_name)
        if config_rank != rank:
            raise AdapterFormatError(
                f"{header.path}: layer {module!r} has rank {rank} in its tensors but {config_rank} in the config "
                "(r / rank_pattern); the config does not belong to these weights"
            )
    else:
        alpha = None
    scaling = 1.0 if alpha is None else lora_scaling(alpha, rank, use_rslora)
    numel = lora_A.numel + lora_B.numel + sum(t.numel for t in (bias, magnitude) if t is not None)
    return LayerInfo(
        rank, alpha, scaling, lora_A.shape, lora_B.shape, bias.shape if bias is not None else None, numel,
        magnitude.shape if magnitude is not None else None,
    )


def weights_file(path: Path) -> tuple[Path, Path | None]:
    """The safetensors file (and PEFT config, if any) of an adapter path."""
    if path.is_file():
        if path.suffix != ".safetensors":
            _refuse_non_safetensors(path)
        return path, None
    config = path / CONFIG_NAME
    for name in (SAFETENSORS_NAME, DIFFUSERS_WEIGHTS_NAME):
        if (path / name).is_file():
            return path / name, config if config.is_file() else None
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0], config if config.is_file() else None
    if (path / PICKLE_NAME).is_file():
        _refuse_non_safetensors(path / PICKLE_NAME)
    raise AdapterNotFoundError(
        f"{path}: holds no single adapter weights file ({SAFETENSORS_NAME}, {DIFFUSERS_WEIGHTS_NAME} "
        f"or one *.safetensors; found {len(candidates)})"
    )


def _refuse_non_safetensors(path: Path) -> None:
    if path.suffix in {".bin", ".pt", ".pth", ".ckpt"}:
        raise PickleRefusedError(
            f"{path} is a pickled checkpoint; inspect reads safetensors headers only and unpickles nothing: "
            "convert it to safetensors (loraswap.load_adapter(..., allow_pickle=True) can read it)"
        )
    raise AdapterFormatError(f"{path}: unknown adapter file type {path.suffix!r}; expected .safetensors or a directory")


def inspect(source: str | os.PathLike, revision: str | None = None) -> AdapterInfo:
    """Describe the LoRA adapter at ``source`` (a PEFT directory, a ``.safetensors`` file or a hub id)
    from its safetensors header and config alone, without loading its tensors."""
    path = resolve_source(source, revision)
    weights, config_path = weights_file(path)
    config = read_config(config_path) if config_path is not None else None
    header = read_safetensors_header(weights)
    configs = component_configs(config, header.metadata, weights)
    for options in configs.values():
        check_config_fields(options, str(weights))
    file_format = detect_format(header.tensors)
    if file_format is None:
        refuse_unsupported(header.tensors, configs.values(), str(weights))  # IA3, LoHa, ...: as a load says it
        raise AdapterFormatError(
            f"{weights}: no LoRA tensors found ({len(header.tensors)} tensors, none named like "
            "'*.lora_A.weight', '*.lora_down.weight' or '*.lora.down.weight'); is this a LoRA adapter?"
        )
    if file_format == FORMAT_PEFT_FILE and path.is_dir():
        file_format = FORMAT_PEFT_DIR
    modules, notes = _group_keys(header, file_format)
    if not modules:
        refuse_unsupported(header.tensors, configs.values(), str(weights))
        raise AdapterFormatError(f"{weights}: no complete LoRA layer (lora_A with lora_B) found")
    unsupported = [*names_of(find_unsupported(header.tensors, configs.values())), *notes]
    layers = {}
    for module, roles in sorted(modules.items()):
        component = _component(module, file_format)
        component_config = configs.get(component or "")
        config_name = module[len(component) + 1 :] if component and file_format == FORMAT_DIFFUSERS else module
        layers[module] = _layer_info(header, module, roles, component_config, config_name)
    lora_keys = [key for roles in modules.values() for role, key in roles.items() if role != "alpha"]
    dtypes = tuple(sorted({header.tensors[key].dtype for key in lora_keys}))
    unsupported += [f"LoRA weights of dtype {dtype} (not floating point)" for dtype in dtypes if dtype not in FLOAT_DTYPES]
    return AdapterInfo(
        source=os.fspath(source),
        format=file_format,
        weights_file=str(weights),
        layers=layers,
        dtypes=dtypes,
        parameter_bytes=sum(header.tensors[key].end - header.tensors[key].begin for key in lora_keys),
        file_bytes=header.file_bytes,
        use_rslora=any(bool(options.get("use_rslora")) for options in configs.values()),
        target_modules=_target_modules(configs, layers, file_format),
        components=tuple(sorted({c for c in (_component(m, file_format) for m in layers) if c})),
        unsupported=tuple(unsupported),
        config=configs[""] if configs.keys() == {""} else configs,
    )


def _target_modules(configs: Mapping[str, dict], layers: Mapping[str, LayerInfo], file_format: str) -> tuple[str, ...]:
    """The config's ``target_modules`` when it names them, else the short names of the layers found."""
    named = set()
    for options in configs.values():
        targets = options.get("target_modules")
        if isinstance(targets, str):
            named.add(targets)
        elif targets:
            named.update(targets)
    if named:
        return tuple(sorted(named))
    return tuple(sorted({_module_kind(module, file_format) for module in layers}))


def adapter_paths(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Expand folders of adapters into their adapters; an adapter folder, a file or a hub id stays as it is.

    A folder is one adapter when it holds ``adapter_config.json`` or a known weights file; otherwise
    each child that is an adapter folder or a ``.safetensors`` file is one adapter.
    """
    expanded: list[str] = []
    for source in paths:
        path = Path(source).expanduser()
        if not path.is_dir() or _is_adapter_dir(path):
            expanded.append(os.fspath(source))
            continue
        children = sorted(
            child
            for child in path.iterdir()
            if child.suffix == ".safetensors" or (child.is_dir() and _is_adapter_dir(child))
        )
        if not children:
            raise AdapterNotFoundError(
                f"{path}: neither an adapter folder nor a folder of adapters (none found inside)"
            )
        expanded.extend(str(child) for child in children)
    return expanded


def _is_adapter_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in (CONFIG_NAME, SAFETENSORS_NAME, DIFFUSERS_WEIGHTS_NAME, PICKLE_NAME))


def _numbers(values, digits: int = 4) -> str:
    return ", ".join(f"{value:.{digits}g}" for value in values) or "-"


def print_infos(infos: Sequence[AdapterInfo], show_layers: bool = False, console: Console | None = None) -> None:
    """One row per adapter; with ``show_layers``, one table per adapter with every layer's rank and scaling."""
    from .plan import format_bytes

    console = console or Console()
    table = Table(title="LoRA adapters (read from headers and configs, no tensor loaded)")
    table.add_column("adapter", overflow="fold")
    for column in ("format", "rank", "alpha", "scaling", "layers"):
        table.add_column(column, justify="left" if column == "format" else "right")
    table.add_column("targets", overflow="fold")
    table.add_column("size", justify="right")
    for info in infos:
        targets = ", ".join(info.target_modules)
        if info.components:
            targets = f"{'+'.join(info.components)}: {targets}"
        if info.unsupported:
            targets += f"\n[red]not hot-swappable: {'; '.join(info.unsupported)}[/red]"
        table.add_row(
            info.source,
            info.format,
            "/".join(str(rank) for rank in info.ranks),
            _numbers(info.alphas),
            _numbers(info.scalings) + (" rsLoRA" if info.use_rslora else "") + (" DoRA" if info.has_dora else ""),
            str(len(info.layers)),
            targets,
            f"{format_bytes(info.parameter_bytes)} {','.join(info.dtypes)}",
        )
    console.print(table)
    if show_layers:
        for info in infos:
            layers = Table(title=f"{info.source}: per-layer ranks")
            for column in ("layer", "rank", "alpha", "scaling", "lora_A", "lora_B"):
                layers.add_column(column, justify="left" if column == "layer" else "right")
            for name, layer in info.layers.items():
                alpha = "-" if layer.alpha is None else f"{layer.alpha:g}"
                layers.add_row(
                    name,
                    str(layer.rank),
                    alpha,
                    f"{layer.scaling:.4g}",
                    str(list(layer.lora_A_shape)),
                    str(list(layer.lora_B_shape)),
                )
            console.print(layers)
