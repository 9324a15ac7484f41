"""``prepare_model_for_compiled_hotswap``: pad PEFT's LoRA layers and turn scalings into tensors, all or nothing.

Every padded layer and every scaling tensor is built before any is installed, so a rank above
``target_rank`` (or a grouped conv it does not divide) raises PEFT's error with the model untouched.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from peft import PeftModel
from peft.tuners.lora import Conv2d as LoraConv2d
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..capacity import target_matches
from .common import _copy_rank_blocks, _unwrap


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
    target_modules: str | list[str] | None = None,
) -> None:
    """Pad every LoRA layer to ``target_rank`` and turn every scaling into a tensor, before compiling.

    Same contract as ``peft.utils.hotswap.prepare_model_for_compiled_hotswap``: call it after the
    first adapter is loaded and before ``torch.compile``; with ``config`` and ``target_rank``, the
    configs' ``r`` and ``rank_pattern`` values become ``target_rank``. Nothing changes unless
    everything can: a rank above ``target_rank``, or a grouped conv whose groups do not divide it,
    raises PEFT's ``ValueError`` with the model untouched.

    ``target_modules`` (loraswap only; needs ``target_rank`` and a ``PeftModel``): module names or
    one regex, as in ``LoraConfig.target_modules``. Each matching Linear/Conv2d that has no LoRA yet
    gets PEFT's LoRA layer for every adapter of the model, of rank ``target_rank`` with zero weights
    and a zero scaling tensor: it adds nothing until a later adapter that targets it is swapped in.
    """
    _check_not_compiled(model, check_compiled)
    if target_modules is not None and target_rank is None:
        raise ValueError(
            "prepare_model_for_compiled_hotswap: target_modules needs a target_rank to size the new layers"
        )
    lora_layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    scalings = _scalings_as_tensors(lora_layers)
    padded = _padded_layers(lora_layers, target_rank) if target_rank is not None else []
    if not lora_layers:
        raise ValueError(
            "No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` after loading "
            "the first adapter and before loading the second adapter."
        )
    new_layers = _planned_new_layers(model, target_modules, target_rank) if target_modules is not None else []
    for module, adapter_name, scaling in scalings:
        module.scaling[adapter_name] = scaling
    for container, adapter_name, layer in padded:
        container[adapter_name] = layer
    _add_zero_layers(model, new_layers, target_rank)
    if config and target_rank is not None:
        for lora_config in config.values() if isinstance(config, dict) else [config]:
            lora_config.r = target_rank
            for key in lora_config.rank_pattern or {}:
                lora_config.rank_pattern[key] = target_rank


def _check_not_compiled(model: nn.Module, check_compiled: str) -> None:
    if not (hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", False)):
        return
    if check_compiled == "error":
        raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
    if check_compiled == "warn":
        warnings.warn(
            "prepare_model_for_compiled_hotswap was called with a model that is already compiled. This will likely "
            "result in re-compilation, hurting performance. Call the function before compiling the model."
        )
    elif check_compiled != "ignore":
        raise ValueError(
            f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead."
        )


def _scalings_as_tensors(lora_layers: list[LoraLayer]) -> list[tuple[LoraLayer, str, torch.Tensor]]:
    """``(layer, adapter name, 0-dim tensor)`` for every float scaling, checked before any is replaced."""
    planned = []
    for module in lora_layers:
        for adapter_name, value in module.scaling.items():
            if isinstance(value, float):
                planned.append((module, adapter_name, torch.tensor(value, device=module.weight.device)))
            elif not isinstance(value, torch.Tensor):
                raise TypeError(
                    "Something went wrong while trying to convert the scalings, expected to find values of type float "
                    f"but found {type(value)} instead."
                )
    return planned


def _padded_layers(lora_layers: list[LoraLayer], target_rank: int) -> list[tuple[nn.ModuleDict, str, nn.Module]]:
    """``(container, adapter name, padded module)`` for every Linear/Conv2d lora_A/lora_B below ``target_rank``."""
    planned = []
    for module in lora_layers:
        if isinstance(module, LoraLinear):
            base_groups = 1
        elif isinstance(module, LoraConv2d):
            base_groups = module.get_base_layer().groups
            if target_rank % base_groups != 0:
                raise ValueError(
                    f"Trying to pad a Conv2d LoRA adapter with groups={base_groups} to target rank "
                    f"{target_rank}, but the target rank is not divisible by {base_groups}. Please choose a "
                    f"target rank that is divisible by {base_groups}."
                )
        else:
            continue
        for container, is_lora_A in ((module.lora_A, True), (module.lora_B, False)):
            for adapter_name, layer in container.items():
                padded = _padded_layer(layer, target_rank, is_lora_A, base_groups)
                if padded is not layer:
                    planned.append((container, adapter_name, padded))
    return planned


def _padded_layer(layer: nn.Module, target_rank: int, is_lora_A: bool, base_groups: int) -> nn.Module:
    """A new ``lora_A``/``lora_B`` module whose rank dimension is ``layer``'s, zero-padded to ``target_rank``."""
    weight = layer.weight
    is_conv = isinstance(layer, nn.Conv2d)
    groups = layer.groups if is_conv else 1
    rank = weight.shape[0] if is_lora_A else weight.shape[1] * groups
    if rank == target_rank:
        return layer
    if rank > target_rank:
        raise ValueError(
            f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger "
            f"({rank}). This is not possible."
        )
    if not is_lora_A and target_rank % groups != 0:
        raise ValueError(
            f"Trying to pad a Conv2d LoRA B with groups={groups} to target rank {target_rank}, but the target "
            f"rank is not divisible by {groups}. Please choose a target rank that is divisible by groups."
        )
    with torch.no_grad():
        if is_lora_A:
            padded = weight.new_zeros(target_rank, *weight.shape[1:])
            _copy_rank_blocks(padded, weight, base_groups)
        else:
            padded = weight.new_zeros(weight.shape[0], target_rank // groups, *weight.shape[2:])
            padded[:, : weight.shape[1]] = weight
    with torch.device("meta"):
        if is_conv:
            channels = (layer.in_channels, target_rank) if is_lora_A else (target_rank, layer.out_channels)
            new_layer = nn.Conv2d(
                *channels,
                kernel_size=layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=groups,
                bias=layer.bias is not None,
                padding_mode=layer.padding_mode,
            )
        else:
            features = (layer.in_features, target_rank) if is_lora_A else (target_rank, layer.out_features)
            new_layer = nn.Linear(*features, bias=layer.bias is not None)
    new_layer.weight = nn.Parameter(padded, requires_grad=weight.requires_grad)
    if layer.bias is not None:
        new_layer.bias = nn.Parameter(layer.bias.data, requires_grad=layer.bias.requires_grad)
    return new_layer.train(layer.training)


def _planned_new_layers(model: nn.Module, target_modules, target_rank: int) -> list[str]:
    """Names (in the base model) of the Linear/Conv2d layers ``target_modules`` names that have no LoRA yet."""
    tuner = _lora_tuner(model)
    if tuner is None:
        raise ValueError(
            "prepare_model_for_compiled_hotswap: target_modules needs a PeftModel (or LoraModel) whose LoRA layers "
            "it can extend"
        )
    inside_lora = set()
    for name, module in tuner.model.named_modules():
        if isinstance(module, BaseTunerLayer):
            inside_lora.update(f"{name}.{child}" for child, _ in module.named_modules() if child)
    planned = []
    for name, module in tuner.model.named_modules():
        if not name or name in inside_lora or isinstance(module, BaseTunerLayer):
            continue
        if not target_matches(target_modules, name):
            continue
        if type(module) not in (nn.Linear, nn.Conv2d):
            raise ValueError(
                f"prepare_model_for_compiled_hotswap: target_modules matches {name!r}, a {type(module).__name__}; "
                "loraswap adds LoRA layers to nn.Linear and nn.Conv2d only: narrow target_modules"
            )
        if isinstance(module, nn.Conv2d) and target_rank % module.groups:
            raise ValueError(
                f"Trying to pad a Conv2d LoRA adapter with groups={module.groups} to target rank {target_rank}, but "
                f"the target rank is not divisible by {module.groups}. Please choose a target rank that is divisible "
                f"by {module.groups}."
            )
        planned.append(name)
    return planned


def _add_zero_layers(model: nn.Module, names: list[str], target_rank: int) -> None:
    """Wrap each named module in PEFT's own LoRA layer, for every adapter, with zero weights and a zero scaling."""
    if not names:
        return
    tuner = _lora_tuner(model)
    for adapter_name, lora_config in tuner.peft_config.items():
        layer_config = LoraConfig(**{**lora_config.to_dict(), "target_modules": list(names)})
        layer_config.r, layer_config.rank_pattern, layer_config.alpha_pattern = target_rank, {}, {}
        for name in names:
            parent_name, _, child_name = name.rpartition(".")
            target = tuner.model.get_submodule(name)
            parent = tuner.model.get_submodule(parent_name)
            tuner._create_and_replace(layer_config, adapter_name, target, child_name, parent, current_key=name)
    with torch.no_grad():
        for name in names:
            layer = tuner.model.get_submodule(name)
            for adapter_name in layer.lora_A:
                layer.lora_A[adapter_name].weight.zero_()
                layer.lora_B[adapter_name].weight.zero_()
                layer.scaling[adapter_name] = torch.zeros((), device=layer.weight.device)
            layer.set_adapter(tuner.active_adapters)
            layer.requires_grad_(False)


def _lora_tuner(model: nn.Module) -> BaseTuner | None:
    root = _unwrap(model)
    if isinstance(root, PeftModel):
        root = root.base_model
    return root if isinstance(root, BaseTuner) else None
