"""``loraswap plan``: the capacity a set of adapters needs on a model, and what it costs, before compiling.

The model is built on the meta device from its configs (no weights are read or allocated). For a
transformers or diffusers model, adapters are read with :func:`loraswap.inspect` (headers only) and
the capacity is the one :meth:`Capacity.for_adapters` builds from those that fit. For a diffusers
pipeline, adapters go through :mod:`loraswap.diffusers` (diffusers' converters, tensors read on the
CPU) and the capacities are the ones ``loraswap.diffusers.attach`` builds. Either way the slot layout
is planned by the code ``attach`` runs, so the bytes reported are the bytes ``attach`` allocates."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from .adapter import Adapter
from .formats.locate import HUB_ID
from .attach import find_targets
from .cache import default_cache_bytes
from .capacity import DEFAULT_MAX_BATCH, Capacity
from .errors import AdapterFormatError, AdapterNotFoundError, CapacityError, HotswapError
from .info import AdapterInfo, LayerInfo, format_bytes
from .layers import SlotSpec, slot_layer_class
from .layout import SlotLayout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class AdapterFit:
    """One adapter against the planned capacity: whether it fits, why not, and how much of its slot is padding."""

    source: str
    format: str
    rank: int
    layers: int
    fits: bool
    reason: str | None = None
    useful_bytes: int = 0
    padding_waste: float | None = None  # fraction of the padded slot that is zeros for this adapter


MODEL = "model"  # the one component of a plain (non-pipeline) model


@dataclass(frozen=True)
class Plan:
    """What ``attach`` will allocate, and which adapters it can serve.

    ``capacities``: component -> Capacity (one entry, ``"model"``, for a plain model; one per
    LoRA-loadable component for a diffusers pipeline). Bytes are summed over components:
    ``slot_bytes`` is one slot on every component, ``host_cache_bytes`` every fitting adapter packed.
    """

    model: str
    capacities: Mapping[str, Capacity]
    wrapped_layers: int
    slot_bytes: int
    device_bytes: int
    routing_bytes: int
    host_cache_bytes: int
    host_cache_budget: int
    adapters: tuple[AdapterFit, ...]
    dora_bytes: int = 0  # of slot_bytes: the DoRA vectors (one [out] per layer; Capacity.dora)

    @property
    def capacity(self) -> Capacity | None:
        """The capacity of a plain model (None for a pipeline or when no adapter fits)."""
        return self.capacities.get(MODEL) if set(self.capacities) == {MODEL} else None

    @property
    def fitting(self) -> tuple[AdapterFit, ...]:
        return tuple(fit for fit in self.adapters if fit.fits)

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["capacities"] = {name: capacity_dict(capacity) for name, capacity in self.capacities.items()}
        result["capacity"] = None if self.capacity is None else capacity_dict(self.capacity)
        return json.loads(json.dumps(result, default=str))


def capacity_dict(capacity: Capacity) -> dict[str, Any]:
    result = asdict(capacity)
    if not isinstance(capacity.target_modules, str):
        result["target_modules"] = list(capacity.target_modules)
    return result


def build_meta_model(model: str, dtype: str = "auto") -> nn.Module | Any:
    """The model named by a local folder or hub id, on the meta device: only configs are read.

    A transformers folder (``config.json`` with ``model_type``) builds its ``architectures[0]`` class,
    a diffusers model folder (``_class_name``) its diffusers class, and a diffusers pipeline folder
    (``model_index.json``) a stand-in of the pipeline class that holds only its LoRA-loadable
    components (see :func:`build_meta_pipeline`). ``dtype="auto"`` takes the config's dtype
    (float32 when it names none).
    """
    index = _model_file(model, "model_index.json", required=False)
    if index is not None:
        return build_meta_pipeline(model, _read_json(model, index), dtype)
    return _build_component(model, _model_file(model, "config.json"), dtype)


def build_meta_pipeline(model: str, model_index: Mapping[str, Any], dtype: str = "auto") -> Any:
    """An instance of the pipeline class, made without ``__init__``, holding its LoRA-loadable components
    built on the meta device: enough for ``loraswap.diffusers`` to read LoRAs and plan slots."""
    import diffusers

    pipeline_class = getattr(diffusers, str(model_index.get("_class_name")), None)
    loadable = getattr(pipeline_class, "_lora_loadable_modules", None)
    if not loadable:
        raise AdapterFormatError(
            f"--model {model}: {model_index.get('_class_name')!r} is not a diffusers pipeline that loads LoRAs"
        )
    pipe = pipeline_class.__new__(pipeline_class)
    for name in loadable:
        entry = model_index.get(name)
        if isinstance(entry, list) and None not in entry:
            object.__setattr__(pipe, name, _build_component(model, _model_file(model, f"{name}/config.json"), dtype))
    return pipe


def _build_component(model: str, config_file: Path, dtype: str) -> nn.Module:
    config = _read_json(model, config_file)
    if "_class_name" not in config and "model_type" not in config:
        raise AdapterFormatError(
            f"--model {model}: {config_file} has neither 'model_type' (transformers) nor '_class_name' (diffusers); "
            "point --model at a model or pipeline folder"
        )
    try:
        if "_class_name" in config:
            built = _build_diffusers(config_file.parent, config)
        else:
            built = _build_transformers(config_file.parent)
    except HotswapError:
        raise
    except Exception as err:  # transformers and diffusers raise many types for configs they cannot build
        raise AdapterFormatError(
            f"--model {model}: cannot build the model from {config_file.name} ({type(err).__name__}: {err})"
        ) from err
    target = DTYPES[dtype] if dtype != "auto" else _config_dtype(config)
    return built if target is None else built.to(target)


def _model_file(model: str, relative: str, required: bool = True) -> Path | None:
    """``relative`` inside a local model folder, or fetched from the hub (config files only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / relative).is_file():
            return path / relative
        if not required:
            return None
        raise AdapterNotFoundError(f"--model {model}: no {relative} in that folder")
    if not HUB_ID.match(model):
        raise AdapterNotFoundError(f"--model {model}: not a local model folder and not a hub id")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model, relative))
    except Exception as err:  # huggingface_hub raises a family of HTTP, offline and cache errors
        if not required:
            return None
        raise AdapterNotFoundError(
            f"--model {model}: cannot fetch its {relative} ({type(err).__name__}); "
            "download the model's configs first or pass a local folder"
        ) from err


def _read_json(model: str, path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFormatError(f"--model {model}: cannot read {path} ({err})") from err
    if not isinstance(config, dict):
        raise AdapterFormatError(f"--model {model}: {path} is not a JSON object")
    return config


def _build_transformers(folder: Path) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        if model_class is None:
            return transformers.AutoModel.from_config(config)
        return model_class._from_config(config)


def _config_dtype(config: Mapping[str, Any]) -> torch.dtype | None:
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _build_diffusers(folder: Path, config: Mapping[str, Any]) -> nn.Module:
    import diffusers

    model_class = getattr(diffusers, config["_class_name"], None)
    if model_class is None or not hasattr(model_class, "from_config"):
        raise AdapterFormatError(f"{folder}: diffusers has no model class {config['_class_name']!r}")
    with torch.device("meta"):
        return model_class.from_config(model_class.load_config(folder))


def plan(
    infos: Sequence[AdapterInfo],
    model: nn.Module,
    *,
    model_name: str = "<model>",
    slots: int = 1,
    per_layer_rank: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    cache_bytes: int | None = None,
) -> Plan:
    """The capacity ``infos`` need on ``model`` (ideally a meta-device model) and what it costs.

    Adapters that cannot be served (unsupported features, targets the model lacks or cannot wrap,
    shapes of another base model, non-PEFT key names) are left out of the capacity, with the reason.
    """
    modules = dict(model.named_modules())
    layers = {info.source: {MODEL: info.layers} for info in infos}
    reasons = {info.source: _unsupported(info) or _non_peft(info) or _misfit(info.layers, modules) for info in infos}
    fitting = [info for info in infos if reasons[info.source] is None]
    capacities = (
        {MODEL: capacity_for(fitting, slots=slots, per_layer_rank=per_layer_rank, max_batch=max_batch)}
        if fitting
        else {}
    )
    return _costs(model_name, infos, {MODEL: model}, capacities, layers, reasons, cache_bytes)


def plan_pipeline(
    infos: Sequence[AdapterInfo],
    pipe: Any,
    *,
    model_name: str = "<pipeline>",
    slots: int = 1,
    cache_bytes: int | None = None,
) -> Plan:
    """The per-component capacities ``loraswap.diffusers.attach(pipe, adapters, slots)`` builds, and their cost.

    ``pipe`` may be a :func:`build_meta_pipeline` stand-in. Each adapter is read through diffusers'
    own converters (as ``pipe.load_lora_weights`` reads it: tensors on the CPU, the pipeline untouched),
    so diffusers, kohya and PEFT files are all planned with the module names they will load into.
    """
    from . import diffusers as loraswap_diffusers

    components = loraswap_diffusers.lora_components(pipe)
    modules = {name: dict(component.named_modules()) for name, component in components.items()}
    layers: dict[str, dict[str, Mapping[str, LayerInfo]]] = {}
    reasons: dict[str, str | None] = {}
    read = []
    for info in infos:
        reasons[info.source] = _unsupported(info)
        if reasons[info.source] is not None:
            continue
        try:
            adapter = loraswap_diffusers.read_pipeline_adapter(pipe, info.source)
        except HotswapError as err:
            reasons[info.source] = _without_source(" ".join(str(err).split()), info.source)
            continue
        layers[info.source] = {name: _layer_infos(part) for name, part in adapter.components.items()}
        reasons[info.source] = next(
            (
                f"{name}: {problem}"
                for name, part in layers[info.source].items()
                if (problem := _misfit(part, modules[name]))
            ),
            None,
        )
        if reasons[info.source] is None:
            read.append(adapter)
    capacities = loraswap_diffusers.capacities_for(pipe, read, slots=slots)[0] if read else {}
    return _costs(model_name, infos, components, capacities, layers, reasons, cache_bytes)


def _costs(
    model_name: str,
    infos: Sequence[AdapterInfo],
    components: Mapping[str, nn.Module],
    capacities: Mapping[str, Capacity],
    layers: Mapping[str, Mapping[str, Mapping[str, LayerInfo]]],
    reasons: Mapping[str, str | None],
    cache_bytes: int | None,
) -> Plan:
    """Lay out every component as ``attach`` would and price each fitting adapter's packed slot."""
    layouts = {}
    wrapped = 0
    for name, capacity in capacities.items():
        targets = find_targets(components[name], capacity)
        wrapped += len(targets)
        layouts[name] = SlotLayout.plan(((n, module, cls.spec(module)) for n, module, cls in targets), capacity)
    slot_bytes = sum(layout.slot_nbytes for layout in layouts.values())
    dora_bytes = sum(
        (group.dora.stop - group.dora.start) * group.dtype.itemsize
        for layout in layouts.values()
        for group in layout.groups
        if group.dora is not None
    )
    routing_bytes = sum((capacity.max_batch + 1) * capacity.slots * 4 + 1 for capacity in capacities.values())
    slots = max((capacity.slots for capacity in capacities.values()), default=0)
    fits, cached = [], 0
    for info in infos:
        reason = reasons[info.source]
        if reason is not None:
            fits.append(_fit(info, reason))
            continue
        parts = layers[info.source]
        packed = sum(layouts[name].slot_nbytes for name in parts)
        useful = sum(
            layer.numel * layouts[name].groups[layouts[name].placements[module].group].dtype.itemsize
            for name, part in parts.items()
            for module, layer in part.items()
        )
        cached += packed
        fits.append(_fit(info, None, useful, 1 - useful / packed))
    return Plan(
        model=model_name,
        capacities=dict(capacities),
        wrapped_layers=wrapped,
        slot_bytes=slot_bytes,
        device_bytes=slots * slot_bytes + routing_bytes,
        routing_bytes=routing_bytes,
        host_cache_bytes=cached,
        host_cache_budget=default_cache_bytes() if cache_bytes is None else cache_bytes,
        adapters=tuple(fits),
        dora_bytes=dora_bytes,
    )


def _without_source(message: str, source: str) -> str:
    """``'<source>/file: why'`` -> ``'why'``: the table already names the adapter."""
    head, separator, tail = message.partition(": ")
    return tail if separator and head.startswith(source) else message


def _layer_infos(adapter: Adapter) -> dict[str, LayerInfo]:
    """An in-memory adapter's layers described as :func:`loraswap.inspect` describes a file's."""
    return {
        name: LayerInfo(
            rank=layer.rank,
            alpha=None,
            scaling=layer.scaling,
            lora_A_shape=tuple(layer.lora_A.shape),
            lora_B_shape=tuple(layer.lora_B.shape),
            bias_shape=None if layer.lora_bias is None else tuple(layer.lora_bias.shape),
            numel=sum(t.numel() for t in (layer.lora_A, layer.lora_B, layer.lora_bias, layer.magnitude) if t is not None),
            magnitude_shape=None if layer.magnitude is None else tuple(layer.magnitude.shape),
        )
        for name, layer in adapter.layers.items()
    }


def capacity_for(
    infos: Iterable[AdapterInfo], *, slots: int = 1, per_layer_rank: bool = False, max_batch: int = DEFAULT_MAX_BATCH
) -> Capacity:
    """What :meth:`Capacity.for_adapters` builds from these adapters, computed from their headers."""
    infos = list(infos)
    if not infos:
        raise CapacityError("a capacity needs at least one adapter")
    return Capacity.for_adapters(infos, slots=slots, per_layer_rank=per_layer_rank, max_batch=max_batch)


def _fit(info: AdapterInfo, reason: str | None, useful: int = 0, waste: float | None = None) -> AdapterFit:
    return AdapterFit(info.source, info.format, info.rank, len(info.layers), reason is None, reason, useful, waste)


def _unsupported(info: AdapterInfo) -> str | None:
    return "not plain LoRA: " + "; ".join(info.unsupported) if info.unsupported else None


def _non_peft(info: AdapterInfo) -> str | None:
    if info.is_peft:
        return None
    return (
        f"{info.format} key names: plan it with --model set to the diffusers pipeline folder, "
        "whose converters map them to module names"
    )


def _misfit(layers: Mapping[str, LayerInfo], modules: Mapping[str, nn.Module]) -> str | None:
    """Why these layers cannot be loaded into slots on this model, or None when they can."""
    for name, layer in layers.items():
        module = modules.get(name)
        if module is None:
            return f"targets {name!r}, which the model does not have (trained on another base model?)"
        layer_class = slot_layer_class(module)
        if layer_class is None:
            return f"targets {name!r}, a {type(module).__name__}, which loraswap cannot wrap"
        problem = _shape_problem(layer, layer_class.spec(module))
        if problem:
            return f"layer {name!r}: {problem}"
    return None


def _shape_problem(layer: LayerInfo, spec: SlotSpec) -> str | None:
    if layer.rank % spec.groups:
        return f"rank {layer.rank} is not a multiple of the conv's groups={spec.groups}"
    expected_A = (layer.rank, *spec.a_tail)
    expected_B = (spec.out, layer.rank // spec.groups, *([1] * spec.b_trailing))
    if layer.lora_A_shape != expected_A or layer.lora_B_shape != expected_B:
        return (
            f"lora_A {list(layer.lora_A_shape)} / lora_B {list(layer.lora_B_shape)} do not fit the layer "
            f"(needs {list(expected_A)} / {list(expected_B)}); trained for another base model"
        )
    if layer.bias_shape is not None and layer.bias_shape != (spec.out,):
        return f"lora_bias {list(layer.bias_shape)} does not fit the layer (needs [{spec.out}])"
    if layer.magnitude_shape is not None:
        if spec.groups > 1:
            return f"DoRA on a conv with groups={spec.groups} cannot be served exactly (PEFT's DoRA norm is wrong there)"
        if math.prod(layer.magnitude_shape) != spec.out:
            return f"DoRA magnitude {list(layer.magnitude_shape)} does not fit the layer (needs [{spec.out}])"
    return None


def waste_percent(fit: AdapterFit) -> str:
    return "-" if fit.padding_waste is None else f"{100 * fit.padding_waste:.1f}%"


def print_plan(result: Plan, console: Console | None = None) -> None:
    """The capacity, the bytes it costs on the device and in the host cache, and each adapter's fit."""
    console = console or Console()
    summary = Table(title=f"loraswap plan for {result.model}", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    for name, capacity in result.capacities.items():
        label = "" if name == MODEL else f"{name}: "
        ranks = sorted(set(capacity.layer_ranks.values()))
        summary.add_row(f"{label}max rank", str(capacity.max_rank))
        summary.add_row(
            f"{label}per-layer ranks", "/".join(map(str, ranks)) if ranks else f"off (all {capacity.max_rank})"
        )
        summary.add_row(f"{label}target layers", str(len(capacity.target_modules)))
        summary.add_row(f"{label}LoRA bias", "yes" if capacity.lora_bias else "no")
        summary.add_row(f"{label}DoRA", "yes" if capacity.dora else "no")
    if result.capacities:
        slots = max(capacity.slots for capacity in result.capacities.values())
        summary.add_row("wrapped layers", str(result.wrapped_layers))
        summary.add_row("slots", str(slots))
        summary.add_row("padded bytes per slot", format_bytes(result.slot_bytes))
        if result.dora_bytes:
            summary.add_row(
                "DoRA vectors per slot",
                f"{format_bytes(result.dora_bytes)} (per forward: one per-row vector times the base output per layer)",
            )
        summary.add_row(
            "device total",
            f"{format_bytes(result.device_bytes)} ({slots} x slot + {format_bytes(result.routing_bytes)} routing)",
        )
        count = len(result.fitting)
        cached = f"{format_bytes(result.host_cache_bytes)} ({count} adapter{'s' if count != 1 else ''} packed)"
        if result.host_cache_bytes > result.host_cache_budget:
            cached += f", over the {format_bytes(result.host_cache_budget)} budget: LRU evicts"
        summary.add_row("host cache", cached)
    else:
        summary.add_row("capacity", "none: no adapter fits")
    console.print(summary)
    adapters = Table(title="adapters")
    adapters.add_column("adapter", overflow="fold")
    for column in ("format", "rank", "layers", "fits", "padding waste"):
        adapters.add_column(column, justify="left" if column == "format" else "right")
    adapters.add_column("why not", overflow="fold")
    for fit in result.adapters:
        adapters.add_row(
            fit.source,
            fit.format,
            str(fit.rank),
            str(fit.layers),
            "yes" if fit.fits else "[red]no[/red]",
            waste_percent(fit),
            fit.reason or "",
        )
    console.print(adapters)
