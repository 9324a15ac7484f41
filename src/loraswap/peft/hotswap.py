"""``hotswap_adapter``: read an adapter with PEFT's own loaders, check it, swap it; keep local ones in a host cache."""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator, Mapping
from typing import Any
from weakref import WeakKeyDictionary

import torch
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
from peft.utils import infer_device, load_peft_weights
from peft.utils.peft_types import PeftType
from torch import nn

from ..cache import AdapterCache, cache_key, default_cache_bytes
from ..formats.locate import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME
from .common import _unwrap, loaded_config
from .state_dict import apply_swap, plan_swap, scan_model

# the config keys PEFT requires equal between the loaded and the incoming adapter (LoRA only)
CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}

# unwrapped model -> its host cache of swap plans; dies with the model
_CACHES: WeakKeyDictionary[nn.Module, AdapterCache] = WeakKeyDictionary()


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """Raise PEFT's ``ValueError`` unless two adapters' configs may be hot-swapped (same type, LoRA, same options)."""
    if config0.peft_type != config1.peft_type:
        raise ValueError(f"Incompatible PEFT types found: {config0.peft_type.value} and {config1.peft_type.value}")
    if config0.peft_type not in CONFIG_KEYS_TO_CHECK:
        supported = ", ".join(peft_type.value for peft_type in CONFIG_KEYS_TO_CHECK)
        raise ValueError(f"Hotswapping only supports {supported} but {config0.peft_type.value} was passed.")
    absent = object()
    for key in CONFIG_KEYS_TO_CHECK[config0.peft_type]:
        # the same values PEFT compares through to_dict(), without deep-copying both configs
        value0, value1 = getattr(config0, key, absent), getattr(config1, key, absent)
        if value0 != value1:
            raise ValueError(f"Configs are incompatible: for {key}, {value0} != {value1}")


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str,
    torch_device: str | None = None,
    **kwargs,
) -> None:
    """Replace the weights (and scalings) of ``adapter_name`` with those of the adapter at ``model_name_or_path``.

    Same contract, exceptions and messages as ``peft.utils.hotswap.hotswap_adapter``; ``kwargs``
    go to PEFT's config and weight loaders (``subfolder``, ``revision``, ``token``, ...). The swap is
    transactional, and an adapter read from a local directory is kept in the model's host cache, so
    swapping back to it reads nothing from disk.
    """
    if torch_device is None:
        torch_device = infer_device()
    source_key = _local_source_key(model_name_or_path, kwargs)
    lora_prefix = PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.LORA]
    if source_key is not None:
        scan = scan_model(model, adapter_name, lora_prefix)
        cache_entry = (source_key, adapter_name, scan.signature)
        plan = _cache_for(scan.root).get(cache_entry)
        if plan is not None:
            check_hotswap_configs_compatible(loaded_config(model, adapter_name), plan.config)
            scan.check_not_merged()
            apply_swap(scan, plan)
            return
    config, state_dict = _read_adapter(model, model_name_or_path, adapter_name, torch_device, kwargs)
    parameter_prefix = PEFT_TYPE_TO_PREFIX_MAPPING[config.peft_type]
    scan = scan_model(model, adapter_name, parameter_prefix)
    scan.check_not_merged()
    plan = plan_swap(model, scan, state_dict, config, parameter_prefix, staging="cpu" if source_key else None)
    if source_key is not None and parameter_prefix == lora_prefix:
        if any(tensor.is_cuda for tensor in scan.tensors.values()):
            plan.copies = {key: value.pin_memory() for key, value in plan.copies.items()}
        _cache_for(scan.root).put((source_key, adapter_name, scan.signature), plan)
    apply_swap(scan, plan)


def _read_adapter(model: nn.Module, model_name_or_path, adapter_name: str, torch_device, kwargs: dict):
    """PEFT's own config and weight loaders, checked as PEFT checks them; keys get the adapter name inserted."""
    hub_kwargs = {name: kwargs.get(name, None) for name in ("subfolder", "revision", "cache_dir", "token")}
    if kwargs.get("use_auth_token", None):
        hub_kwargs["use_auth_token"] = kwargs["use_auth_token"]
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftConfig._get_peft_type(model_name_or_path, **hub_kwargs)]
    config = config_class.from_pretrained(model_name_or_path, **kwargs)
    check_hotswap_configs_compatible(loaded_config(model, adapter_name), config)
    state_dict = load_peft_weights(model_name_or_path, device=torch_device, **kwargs)
    parameter_prefix = PEFT_TYPE_TO_PREFIX_MAPPING[config.peft_type]
    return config, dict(_with_adapter_name(state_dict, adapter_name, parameter_prefix))


def _with_adapter_name(
    state_dict: Mapping[str, torch.Tensor], adapter_name: str, parameter_prefix: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Saved keys -> model keys: ``x.lora_A.weight`` -> ``x.lora_A.<adapter>.weight``, ``x.lora_embedding_A`` ->
    ``x.lora_embedding_A.<adapter>``; keys without ``parameter_prefix`` pass unchanged."""
    for key, value in state_dict.items():
        if parameter_prefix in key:
            head, prefix, tail = key.rpartition(parameter_prefix)
            container, dot, rest = tail.partition(".")
            key = f"{head}{prefix}{container}.{adapter_name}{dot}{rest}"
        yield key, value


def _local_source_key(model_name_or_path, kwargs: Mapping[str, Any]) -> Hashable | None:
    """A cache key for a local adapter directory (files' size and mtime, loader kwargs); None for anything else."""
    path = os.fspath(model_name_or_path)
    if kwargs.get("subfolder") is not None:
        path = os.path.join(path, kwargs["subfolder"])
    has_weights = any(os.path.isfile(os.path.join(path, name)) for name in (SAFETENSORS_NAME, PICKLE_NAME))
    if not (os.path.isfile(os.path.join(path, CONFIG_NAME)) and has_weights):
        return None
    options = tuple(sorted((name, repr(value)) for name, value in kwargs.items()))
    return (cache_key(path), options)


def _cache_for(root: nn.Module) -> AdapterCache:
    cache = _CACHES.get(root)
    if cache is None:
        cache = _CACHES[root] = AdapterCache(default_cache_bytes())
    return cache


def clear_hotswap_cache(model: nn.Module) -> None:
    """Drop every adapter ``hotswap_adapter`` cached for ``model``."""
    cache = _CACHES.get(_unwrap(model))
    if cache is not None:
        cache.clear()
