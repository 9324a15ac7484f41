"""Reading a LoRA for a pipeline: any file ``load_lora_weights`` accepts -> component -> :class:`Adapter`.

Reading goes through diffusers' own converters, so it accepts what ``pipe.load_lora_weights``
accepts (diffusers and PEFT-keyed files, kohya/A1111 for SD1.5 and SDXL te1/te2, kohya/xlabs Flux,
hub ids, state dicts): ``type(pipe).lora_state_dict`` turns the file into diffusers keys plus
``network_alphas``, then each component's part is converted to PEFT keys with
``convert_unet_state_dict_to_peft`` / ``convert_state_dict`` (text encoders). Two places where
diffusers 0.42 gets a kohya file wrong are done differently here:

- kohya per-module ``alpha``: diffusers folds them into a LoraConfig whose ``alpha_pattern`` keys
  do not name text-encoder modules, so a text-encoder layer gets the most common alpha. Here each
  layer's alpha is traced to its own ``lora_A`` tensor (the converters move tensors, never copy
  them) and its scaling is exactly ``alpha / rank``.
- old-style text-encoder keys (``to_q_lora``) are detected per key, not from whether an
  ``out_proj`` key happens to be present, so a kohya file that trains only ``q_proj`` loads.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError
from torch import nn

from ..adapter import Adapter, adapter_from_state_dict, load_adapter
from ..cache import cache_key, file_stamp
from ..errors import AdapterFormatError, AdapterNotFoundError, CapacityError, HotswapError
from ..formats.locate import HUB_ID, SAFETENSORS, download_from_hub, is_peft_dir, locate_path
from ..formats.lora_keys import component_configs
from ..formats.safetensors import read_safetensors_header
from ..formats.support import refuse_unsupported
from .dora_scale import check_all_traced, take_dora_scales, with_magnitudes

PipelineSource = Union[str, os.PathLike, Mapping[str, torch.Tensor], Adapter, "PipelineAdapter"]


@dataclass(frozen=True)
class PipelineAdapter:
    """One LoRA checkpoint split per pipeline component: component name -> normalised :class:`Adapter`."""

    components: Mapping[str, Adapter]
    source: str

    @property
    def max_rank(self) -> int:
        return max(adapter.max_rank for adapter in self.components.values())

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}: {len(a.layers)} layers" for name, a in self.components.items())
        return f"PipelineAdapter({self.source!r}, {parts})"




def lora_components(pipe: Any) -> dict[str, nn.Module]:
    """The components diffusers loads LoRAs into (``pipe._lora_loadable_modules``) that the pipeline has."""
    names = getattr(pipe, "_lora_loadable_modules", None)
    if not names:
        raise HotswapError(
            f"{type(pipe).__name__} has no LoRA-loadable components (_lora_loadable_modules); "
            "loraswap.diffusers works on pipelines that support load_lora_weights"
        )
    return {name: module for name in names if isinstance(module := getattr(pipe, name, None), nn.Module)}


def is_text_encoder(module: nn.Module) -> bool:
    """transformers models (text encoders) take diffusers' text-encoder key path; diffusers models the other."""
    from diffusers import ModelMixin

    return not isinstance(getattr(module, "_orig_mod", module), ModelMixin)  # torch.compile's wrapper unwrapped



def read_pipeline_adapter(
    pipe: Any, source: PipelineSource, *, allow_pickle: bool = False, **hub_kwargs: Any
) -> PipelineAdapter:
    """Read ``source`` as ``pipe.load_lora_weights`` would, split per component, in PEFT keys with exact scalings.

    ``hub_kwargs`` (``weight_name``, ``subfolder``, ``revision``, ...) go to diffusers' ``lora_state_dict``;
    ``load_into_transformer_2=True`` gives the file's ``transformer`` part to ``transformer_2`` instead, as
    Wan 2.2's ``load_lora_weights`` does (its low-noise expert). A PEFT adapter directory (``adapter_config.json``) or an :class:`Adapter` goes to the one component
    that has every layer it targets.
    """
    if isinstance(source, PipelineAdapter):
        return source
    into_transformer_2 = bool(hub_kwargs.pop("load_into_transformer_2", False))
    components = lora_components(pipe)
    if isinstance(source, Adapter) or is_peft_dir(source):
        adapter = load_adapter(source, allow_pickle=allow_pickle)
        return PipelineAdapter({_component_for(adapter, components): adapter}, adapter.source)
    label = _label(source)
    source, hub_kwargs = resolve_hub_id(source, hub_kwargs, allow_pickle)
    source, dora_scales = take_dora_scales(source, label)  # before diffusers, which deletes dora_scale keys
    _refuse_unsupported(source, hub_kwargs, label)
    state_dict, network_alphas, metadata = _diffusers_state_dict(pipe, source, label, allow_pickle, hub_kwargs)
    _check_prefixes(state_dict, components, label)
    adapters = {}
    traced: set[int] = set()
    for name, module in components.items():
        part = {key[len(name) + 1 :]: value for key, value in state_dict.items() if key.startswith(name + ".")}
        if not part:
            continue
        alphas = {key[len(name) + 1 :]: float(value) for key, value in network_alphas.items() if key.startswith(name + ".")}
        config = {key[len(name) + 1 :]: value for key, value in metadata.items() if key.startswith(name + ".")}
        adapters[name] = component_adapter(part, alphas, config or None, module, f"{label}:{name}", (dora_scales, traced))
    if not adapters:
        raise AdapterFormatError(f"{label}: holds no LoRA tensors for any of {sorted(components)}")
    check_all_traced(dora_scales, traced, label)
    if into_transformer_2:
        adapters = _into_transformer_2(adapters, components, label)
    return PipelineAdapter(adapters, label)


def _into_transformer_2(adapters: Mapping[str, Adapter], components: Mapping[str, nn.Module], label: str) -> dict[str, Adapter]:
    """The ``transformer`` part given to ``transformer_2`` (diffusers' ``load_into_transformer_2=True``)."""
    if "transformer_2" not in components or "transformer" not in adapters:
        raise CapacityError(
            f"{label}: load_into_transformer_2=True needs a pipeline with a transformer_2 (Wan 2.2) and a LoRA with "
            f"transformer keys; this pipeline has {sorted(components)} and the LoRA targets {sorted(adapters)}"
        )
    moved = {name: adapter for name, adapter in adapters.items() if name != "transformer"}
    moved["transformer_2"] = adapters["transformer"]
    return moved


def component_adapter(
    state_dict: Mapping[str, torch.Tensor],
    network_alphas: Mapping[str, float],
    config: Mapping[str, Any] | None,
    module: nn.Module,
    source: str,
    dora_scales: tuple[Mapping[int, Any], set[int]] | None = None,
) -> Adapter:
    """One component's diffusers-keyed LoRA tensors -> :class:`Adapter` (PEFT module names, exact scalings).

    With kohya ``network_alphas``, each layer's scaling is its own ``alpha / rank``; otherwise the
    LoraConfig diffusers saved in the header (``config``) applies, and without one the scaling is 1
    (diffusers' meaning of an alpha-less file).
    """
    alpha_by_tensor = _alphas_by_tensor(state_dict, network_alphas, source)
    try:
        peft_state_dict = _to_peft_keys(state_dict, text_encoder=is_text_encoder(module), module=module)
    except CONVERTER_ERRORS as err:
        raise AdapterFormatError(f"{source}: diffusers cannot convert these LoRA keys ({err})") from err
    if dora_scales is not None:  # kohya dora_scale, by the identity of each module's lora_down (see dora_scale.py)
        peft_state_dict = with_magnitudes(peft_state_dict, dora_scales[0], source, dora_scales[1])
    if alpha_by_tensor:
        for key, tensor in list(peft_state_dict.items()):
            if key.endswith(".lora_A.weight") and id(tensor) in alpha_by_tensor:
                module_name = key[: -len(".lora_A.weight")]
                peft_state_dict[f"{module_name}.alpha"] = torch.tensor(alpha_by_tensor[id(tensor)])
        config = None
    return adapter_from_state_dict(peft_state_dict, config, source=source)


def _alphas_by_tensor(state_dict, network_alphas: Mapping[str, float], source: str) -> dict[int, float]:
    """``id(lora_A tensor) -> alpha`` for every kohya alpha, found by the names diffusers gives them.

    diffusers names a layer's alpha after its down weight: ``<module>.alpha`` (unet, ``.lora.`` keys)
    or ``<down key>.alpha`` (text encoders, attention processors). Tensors keep their identity
    through every key converter, so the alpha follows its own layer whatever the key becomes.
    """
    if not network_alphas:
        return {}
    found: dict[int, float] = {}
    used: set[str] = set()
    for key, tensor in state_dict.items():
        if not any(marker in key for marker in (".down.", ".lora_A.", ".lora_down.")):
            continue
        stems = (key.split(".lora.")[0], key.split(".lora_A.")[0], key.split(".lora_down.")[0], key)
        for stem in stems:
            alpha_key = stem + ".alpha"
            if alpha_key in network_alphas:
                found[id(tensor)] = float(network_alphas[alpha_key])
                used.add(alpha_key)
                break
    unused = sorted(set(network_alphas) - used)
    if unused:
        raise AdapterFormatError(
            f"{source}: alpha {unused[0]!r} belongs to no LoRA layer of the file; the file is incomplete or "
            "its keys are in a layout diffusers does not convert"
        )
    return found


def _to_peft_keys(state_dict, text_encoder: bool, module: nn.Module) -> dict[str, torch.Tensor]:
    from diffusers.utils.state_dict_utils import (
        DIFFUSERS_OLD_TO_PEFT,
        DIFFUSERS_TO_PEFT,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    if not text_encoder:
        return convert_unet_state_dict_to_peft(dict(state_dict))
    # Per key: old processor names (to_q_lora) first, then lora_linear_layer / text_projection names.
    converted = convert_state_dict(convert_state_dict(dict(state_dict), DIFFUSERS_OLD_TO_PEFT), DIFFUSERS_TO_PEFT)
    if not hasattr(module, "text_model"):  # transformers 5 flattened CLIPTextModel
        converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    return converted


# keyword arguments of load_lora_weights that say where to download from, not how to read
HUB_DOWNLOAD_KWARGS = ("revision", "cache_dir", "token", "force_download", "proxies", "local_files_only")


def resolve_hub_id(
    source: PipelineSource, hub_kwargs: Mapping[str, Any], allow_pickle: bool = False
) -> tuple[PipelineSource, dict[str, Any]]:
    """A hub id -> its local copy through huggingface_hub (the file ``weight_name`` names, else the repo's
    weight files), plus the read options left for diffusers; any other source comes back unchanged.

    Resolving before reading gives the host cache a file to stamp, so a hub id loads from the cache
    like a path does, and offline (``HF_HUB_OFFLINE=1``) it reads the local HF cache only.
    """
    if not isinstance(source, (str, os.PathLike)) or Path(source).expanduser().exists():
        return source, dict(hub_kwargs)
    repo_id = os.fspath(source)
    if not HUB_ID.match(repo_id):
        return source, dict(hub_kwargs)
    download = {key: value for key, value in hub_kwargs.items() if key in HUB_DOWNLOAD_KWARGS}
    read = {key: value for key, value in hub_kwargs.items() if key not in HUB_DOWNLOAD_KWARGS}
    subfolder = read.pop("subfolder", None)
    if read.get("weight_name"):
        return download_from_hub(repo_id, filename=read.pop("weight_name"), subfolder=subfolder, **download), read
    patterns = ["*.safetensors", "*.bin"] if allow_pickle else ["*.safetensors"]
    if subfolder:
        patterns = [f"{subfolder}/{pattern}" for pattern in patterns]
    return download_from_hub(repo_id, allow_patterns=patterns, **download), {**read, "subfolder": subfolder}


# What diffusers' key converters raise on a layout they do not expect (asserts on Flux widths, missing keys, ...)
CONVERTER_ERRORS = (ValueError, KeyError, AssertionError, IndexError, TypeError, AttributeError)


def _refuse_unsupported(source, hub_kwargs: Mapping[str, Any], label: str) -> None:
    """Refuse what diffusers' converters would drop or misname (kohya/LyCORIS ``dora_scale``, LoHa, LoKr, the BFL
    control layout, ...) by the same keys-and-config check as ``load_adapter`` and ``inspect``, on the keys as
    they are in the file (or state dict), before any converter sees them."""
    if isinstance(source, Mapping):
        refuse_unsupported(source.keys(), [], label)
        return
    path = Path(source).expanduser()
    folder = path / hub_kwargs["subfolder"] if path.is_dir() and hub_kwargs.get("subfolder") else path
    if hub_kwargs.get("weight_name") and folder.is_dir():
        folder = folder / hub_kwargs["weight_name"]
    try:
        located = locate_path(folder)
    except HotswapError:
        return  # no single weights file (several files, an unknown suffix): diffusers decides and reports
    if located.kind != SAFETENSORS:
        return  # a pickle: diffusers reads it only with allow_pickle, and reports
    weights = located.weights
    header = read_safetensors_header(weights)
    refuse_unsupported(header.tensors, component_configs(None, header.metadata, weights).values(), label)


def _diffusers_state_dict(pipe, source, label: str, allow_pickle: bool, hub_kwargs: Mapping[str, Any]):
    """``(state_dict, network_alphas, metadata)`` from the pipeline class's own ``lora_state_dict``."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists() and not HUB_ID.match(os.fspath(source)):
            raise AdapterNotFoundError(
                f"{label}: no such file or directory; pass a LoRA .safetensors file, a directory holding one, "
                "a hub id or a state dict"
            )
        source = str(path) if path.exists() else os.fspath(source)
    elif isinstance(source, Mapping):
        source = dict(source)
    else:
        raise AdapterFormatError(f"cannot read a LoRA from a {type(source).__name__}; pass a path, hub id or state dict")
    read = type(pipe).lora_state_dict
    kwargs: dict[str, Any] = dict(hub_kwargs)
    kwargs["return_lora_metadata"] = True
    kwargs.setdefault("use_safetensors", None if allow_pickle else True)
    wants_alphas = "return_alphas" in inspect.signature(read).parameters
    if wants_alphas:
        kwargs["return_alphas"] = True
    if isinstance(pipe, StableDiffusionXLLoraLoaderMixin) and getattr(pipe, "unet", None) is not None:
        kwargs.setdefault("unet_config", pipe.unet.config)
    try:
        result = read(source, **kwargs)
    except (OSError, RuntimeError, SafetensorError, *CONVERTER_ERRORS) as err:
        if isinstance(err, FileNotFoundError) or "does not appear to have a file" in str(err):
            raise AdapterNotFoundError(f"{label}: diffusers found no LoRA weights there ({err})") from err
        raise AdapterFormatError(
            f"{label}: diffusers' converter rejected this LoRA ({type(err).__name__}: {err}); its keys or shapes do "
            "not fit the layout the converter expects (e.g. a kohya Flux file for a transformer of another width): "
            "check that the LoRA was trained for this pipeline's model"
        ) from err
    if len(result) == 3:
        state_dict, network_alphas, metadata = result
    else:
        (state_dict, metadata), network_alphas = result, None
    return state_dict, dict(network_alphas or {}), dict(metadata or {})


def _check_prefixes(state_dict, components: Mapping[str, nn.Module], label: str) -> None:
    """Every key must belong to a component the pipeline has: a LoRA for a missing text_encoder_2 is an error."""
    for key in state_dict:
        if not any(key.startswith(name + ".") for name in components):
            raise CapacityError(
                f"{label}: key {key!r} targets no LoRA-loadable component of this pipeline "
                f"(it has {sorted(components)}); was the LoRA trained for another pipeline?"
            )


def _component_for(adapter: Adapter, components: Mapping[str, nn.Module]) -> str:
    for name, module in components.items():
        names = {module_name for module_name, _ in module.named_modules()}
        if adapter.target_names <= names:
            return name
    raise CapacityError(
        f"{adapter.source}: no component of the pipeline ({sorted(components)}) has every layer the adapter targets, "
        f"e.g. {min(adapter.target_names)!r}; was it trained for another model?"
    )


def _label(source) -> str:
    if isinstance(source, Mapping):
        return "<state dict>"
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)


def source_cache_key(
    source: PipelineSource, hub_kwargs: Mapping[str, Any], allow_pickle: bool = False
) -> Hashable | None:
    """The stamps of the files a read would use (a hub id's local copy included) plus the read options;
    None (never cached) for in-memory state dicts."""
    if isinstance(source, (Adapter, PipelineAdapter)):
        return ("object", id(source))
    if isinstance(source, Mapping):
        return None
    source, hub_kwargs = resolve_hub_id(source, hub_kwargs, allow_pickle)
    path = Path(source).expanduser()
    options = tuple(sorted((k, repr(v)) for k, v in hub_kwargs.items()))
    if path.is_file():  # any file diffusers reads (not only the ones load_adapter takes)
        return (("file", file_stamp(path)), options)
    if not path.is_dir():
        return (cache_key(path), options)  # AdapterNotFoundError
    folder = path / hub_kwargs["subfolder"] if hub_kwargs.get("subfolder") else path
    weight_files = sorted(f for f in folder.glob("*") if f.suffix in (".safetensors", ".bin", ".json"))
    return ("dir", str(folder), tuple((f.name, file_stamp(f)) for f in weight_files), options)


