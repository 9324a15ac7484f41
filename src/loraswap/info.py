"""``loraswap.inspect``: what a LoRA checkpoint holds, from its safetensors header and config alone.

A safetensors file starts with an 8-byte length and a JSON header that names every tensor's dtype,
shape and byte range. That is enough to tell the format (PEFT, diffusers, kohya/A1111), the rank of
every layer, the dtypes and the parameter bytes, so inspecting a multi-gigabyte file reads a few
kilobytes. The only tensor bytes ever read are per-layer ``alpha`` scalars (kohya and some diffusers
files keep alpha there, not in a config): a few bytes each. Nothing is unpickled, nothing is mmapped.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AdapterFormatError, PickleRefusedError
from .formats.locate import PICKLE, locate
from .formats.lora_keys import (
    FORMAT_DIFFUSERS,
    FORMAT_KOHYA,
    FORMAT_PEFT_DIR,
    FORMAT_PEFT_FILE,
    PEFT_FORMATS,
    component_configs,
    config_rank_mismatch,
    dora_magnitudes_missing,
    detect_format,
    group_keys,
    key_component,
    layer_rank_and_alpha,
    lora_scaling,
    module_kind,
    ranks_disagree,
    read_config,
)
from .formats.dora_scale import check_dora_scales
from .formats.safetensors import FLOAT_DTYPES, SafetensorsHeader, read_safetensors_header, read_scalar
from .formats.support import DORA_SCALE, check_config_fields, find_unsupported, names_of, refuse_unsupported

if TYPE_CHECKING:
    from rich.console import Console


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
        return self.format in PEFT_FORMATS

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
        raise ranks_disagree(str(header.path), module, lora_A.shape, lora_B.shape)
    use_rslora = bool(config and config.get("use_rslora", False))
    if "alpha" in roles:
        alpha: float | None = read_scalar(header, roles["alpha"])
    elif config:
        config_rank, alpha = layer_rank_and_alpha(config, config_name)
        if config_rank != rank:
            raise config_rank_mismatch(str(header.path), module, rank, config_rank)
    else:
        alpha = None
    scaling = 1.0 if alpha is None else lora_scaling(alpha, rank, use_rslora)
    numel = lora_A.numel + lora_B.numel + sum(t.numel for t in (bias, magnitude) if t is not None)
    return LayerInfo(
        rank, alpha, scaling, lora_A.shape, lora_B.shape, bias.shape if bias is not None else None, numel,
        magnitude.shape if magnitude is not None else None,
    )


def _refuse_pickle(path: Path) -> None:
    raise PickleRefusedError(
        f"{path} is a pickled checkpoint; inspect reads safetensors headers only and unpickles nothing: "
        "convert it to safetensors (loraswap.load_adapter(..., allow_pickle=True) can read it)"
    )


def inspect(source: str | os.PathLike, revision: str | None = None) -> AdapterInfo:
    """Describe the LoRA adapter at ``source`` (a PEFT directory, a ``.safetensors`` file or a hub id)
    from its safetensors header and config alone, without loading its tensors."""
    located = locate(source, revision)
    if located.kind == PICKLE:
        _refuse_pickle(located.weights)
    weights = located.weights
    config = read_config(located.config) if located.config is not None else None
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
    if file_format == FORMAT_PEFT_FILE and located.directory:
        file_format = FORMAT_PEFT_DIR
    modules, notes = group_keys(header.tensors, file_format, str(weights))
    if not modules:
        refuse_unsupported(header.tensors, configs.values(), str(weights))
        raise AdapterFormatError(f"{weights}: no complete LoRA layer (lora_A with lora_B) found")
    found = find_unsupported(header.tensors, configs.values())
    dora_outputs: dict[str, int] = {}
    if file_format == FORMAT_KOHYA:  # the pipeline reader serves output-axis dora_scale: the same check, on shapes
        shapes = {key: entry.shape for key, entry in header.tensors.items()}
        dora_outputs = check_dora_scales(str(weights), shapes, header.metadata)
        found = [item for item in found if item.feature is not DORA_SCALE]
    unsupported = [*names_of(found), *notes]
    layers = {}
    for module, roles in sorted(modules.items()):
        component = key_component(module, file_format)
        component_config = configs.get(component or "")
        config_name = module[len(component) + 1 :] if component and file_format == FORMAT_DIFFUSERS else module
        layers[module] = _layer_info(header, module, roles, component_config, config_name)
        if module in dora_outputs:
            layers[module] = dataclasses.replace(layers[module], magnitude_shape=(dora_outputs[module],))
    if configs.get("", {}).get("use_dora") and file_format in PEFT_FORMATS:
        missing = [module for module, layer in layers.items() if layer.magnitude_shape is None]
        if missing:
            raise dora_magnitudes_missing(str(weights), missing)
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
        components=tuple(sorted({c for c in (key_component(m, file_format) for m in layers) if c})),
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
    return tuple(sorted({module_kind(module, file_format) for module in layers}))


def format_bytes(count: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _numbers(values, digits: int = 4) -> str:
    return ", ".join(f"{value:.{digits}g}" for value in values) or "-"


def print_infos(infos: Sequence[AdapterInfo], show_layers: bool = False, console: Console | None = None) -> None:
    """One row per adapter; with ``show_layers``, one table per adapter with every layer's rank and scaling."""
    from rich.console import Console
    from rich.table import Table

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
