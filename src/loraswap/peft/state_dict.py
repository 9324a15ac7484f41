"""``hotswap_adapter_from_state_dict``: check a swap as PEFT would, in PEFT's order, then write it in one go.

``plan_swap`` raises what PEFT raises, where PEFT raises it, but writes nothing; ``apply_swap``
writes a checked plan with one foreach copy. So a swap PEFT would abandon halfway leaves every
tensor of the model bit-for-bit as it was.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import Conv2d as LoraConv2d
from peft.tuners.lora import LoraConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..formats.lora_keys import layer_rank_and_alpha, lora_scaling
from .common import _copy_rank_blocks, _unwrap


@dataclass
class SwapPlan:
    """One swap, checked against a model and laid out for it, before anything is written.

    ``copies``: key -> value padded to the parameter's shape and dtype. ``replacements``: key -> a
    larger-rank tensor whose contents replace the parameter's (PEFT's ``swap_tensors`` path, taken
    only when the model was not padded far enough). ``zeroed``: the adapter's keys the incoming
    state dict lacks. ``layers``: LoRA module path -> (rank, alpha, scaling) the incoming config gives it.
    """

    copies: dict[str, torch.Tensor] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    zeroed: list[str] = field(default_factory=list)
    layers: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    config: Any = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.copies.values(), *self.replacements.values()))


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Swap the weights of ``adapter_name`` for those of ``state_dict`` (keys as in the model, adapter name included).

    Same contract, exceptions and messages as ``peft.utils.hotswap.hotswap_adapter_from_state_dict``,
    but transactional: when it raises, the model is as it was. Layers the model's adapter has and
    ``state_dict`` lacks are zeroed.

    Raises:
        RuntimeError: ``state_dict`` targets layers the model's adapter lacks (or ``adapter_name`` is unknown).
        ValueError: the adapter is merged, or a tensor cannot be fitted into the model's.
    """
    scan = scan_model(model, adapter_name, parameter_prefix)
    scan.check_not_merged()
    plan = plan_swap(model, scan, state_dict, config, parameter_prefix)
    apply_swap(scan, plan)


@dataclass(frozen=True)
class ModelScan:
    """One walk over the model: the adapter's state-dict entries, every module by path, whether it is merged."""

    root: nn.Module
    adapter_name: str
    tensors: dict[str, torch.Tensor]
    modules: dict[str, nn.Module]
    merged: bool

    def check_not_merged(self) -> None:
        if self.merged:
            raise ValueError(
                f"Cannot hot-swap adapter '{self.adapter_name}' because it is currently merged into the base weights. "
                "Please unmerge the adapter first by calling `peft_model.unmerge_adapter()` (or, for diffusers "
                "models, `diffusers_model.unfuse_lora()`); unmerging after a swap of merged weights would otherwise "
                "corrupt them."
            )

    def module(self, path: str) -> nn.Module:
        return self.modules[path] if path in self.modules else self.root.get_submodule(path)

    @property
    def signature(self) -> Hashable:
        """What a cached plan depends on: the adapter's keys and each tensor's shape, dtype and device."""
        return tuple((key, tuple(t.shape), t.dtype, t.device) for key, t in self.tensors.items())


def scan_model(model: nn.Module, adapter_name: str, parameter_prefix: str = "lora_") -> ModelScan:
    """Walk the model once. The adapter's entries are those ``state_dict`` holds under a path with
    ``<..lora_*..>.<adapter_name>`` as whole components: exactly ``adapter_name``, never ``adapter_name``-something."""
    root = _unwrap(model)
    tensors, modules, merged = {}, {}, False
    for path, module in root.named_modules():
        modules[path] = module
        if isinstance(module, BaseTunerLayer) and adapter_name in module.merged_adapters:
            merged = True
        parts = path.split(".")
        if _lora_module_path(path, adapter_name, parameter_prefix) is not None:
            owned = [(name, t) for name, t in module._parameters.items() if t is not None]
            owned += [
                (name, t)
                for name, t in module._buffers.items()
                if t is not None and name not in module._non_persistent_buffers_set
            ]
            tensors.update((f"{path}.{name}", tensor) for name, tensor in owned)
        elif parameter_prefix in parts[-1] and module._parameters.get(adapter_name) is not None:
            tensors[f"{path}.{adapter_name}"] = module._parameters[adapter_name]
    return ModelScan(root, adapter_name, tensors, modules, merged)


def plan_swap(
    model: nn.Module,
    scan: ModelScan,
    state_dict: Mapping[str, torch.Tensor],
    config: Any,
    parameter_prefix: str = "lora_",
    staging: str | None = None,
) -> SwapPlan:
    """Check ``state_dict`` as PEFT's swap would, raising what PEFT raises in PEFT's order; writes nothing.

    Padded values are built on each parameter's device, or on ``staging`` ("cpu" for the host cache).
    """
    root, adapter_name, tensors = scan.root, scan.adapter_name, scan.tensors
    missing = set(tensors)
    unexpected = []
    for key in state_dict:
        try:
            attrgetter(key)(model)
        except AttributeError:
            unexpected.append(key)
            continue
        if key not in missing:
            # PEFT removes each key from its set of the adapter's keys: a key outside it fails with this KeyError
            raise KeyError(("_orig_mod." if root is not model else "") + key)
        missing.remove(key)
    if unexpected:
        raise RuntimeError(f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}.")
    plan = SwapPlan(zeroed=[key for key in tensors if key in missing], config=config)
    base_prefix = _base_prefix(root)
    use_rslora = bool(getattr(config, "use_rslora", False))
    for key, new_value in state_dict.items():
        module_path = _lora_module_path(key, adapter_name, parameter_prefix)
        module = scan.module(module_path)
        rank, alpha = _config_rank_and_alpha(config, module_path.removeprefix(base_prefix))
        scaling = lora_scaling(alpha, rank, use_rslora)
        _check_scaling_type(module.scaling[adapter_name], scaling)
        plan.layers[module_path] = (rank, alpha, scaling)
        _plan_tensor(plan, key, module, tensors[key], new_value, staging)
    return plan


def _plan_tensor(plan: SwapPlan, key: str, module: nn.Module, old: torch.Tensor, new: torch.Tensor, staging) -> None:
    """Lay ``new`` out as PEFT's swap would write it into ``old``, raising what PEFT would raise there."""
    new = new.to(old.device if staging is None else staging)
    if old.shape == new.shape:
        plan.copies[key] = new.to(old.dtype)
        return
    if not all(o >= n for o, n in zip(old.shape, new.shape)):
        plan.replacements[key] = new
        return
    if old.dim() not in (2, 4):
        raise NotImplementedError(
            f"Trying to hotswap an adapter whose weight has {old.dim()} dimensions, but only Conv2d and "
            "Linear are supported"
        )
    padded = torch.zeros(old.shape, dtype=old.dtype, device=new.device)
    if old.shape[0] > new.shape[0]:
        grouped_lora_A = isinstance(module, LoraConv2d) and ".lora_A." in key
        _copy_rank_blocks(padded, new, module.get_base_layer().groups if grouped_lora_A else 1)
    elif old.shape[1] > new.shape[1]:
        padded[:, : new.shape[1]].copy_(new)
    else:
        raise ValueError(
            f"Incompatible shapes found for LoRA weights {key}: {old.shape} vs {new.shape}. Please "
            "ensure that all ranks are padded to the largest rank among all LoRA adapters by using "
            "peft.utils.hotswap.prepare_model_for_compiled_hotswap."
        )
    plan.copies[key] = padded


def _check_scaling_type(current: Any, scaling: float) -> None:
    if isinstance(current, (torch.Tensor, float, int)) or current == scaling:
        return
    raise TypeError(
        "Something went wrong when trying to set the new scale value, expected to find the old value to be of type "
        f"float or torch.Tensor, got {type(current)} instead."
    )


def apply_swap(scan: ModelScan, plan: SwapPlan) -> None:
    """Write a checked plan: zeroes and copies as one foreach call each, tensor scalings as one more."""
    tensors, adapter_name = scan.tensors, scan.adapter_name
    modules = {path: scan.module(path) for path in plan.layers}
    for path, module in modules.items():
        _check_scaling_type(module.scaling[adapter_name], plan.layers[path][2])
    with torch.no_grad():
        if plan.zeroed:
            torch._foreach_zero_([tensors[key] for key in plan.zeroed])
        if plan.copies:
            sources = list(plan.copies.values())
            pinned = all(source.is_pinned() for source in sources)
            torch._foreach_copy_([tensors[key] for key in plan.copies], sources, non_blocking=pinned)
        for key, new_value in plan.replacements.items():
            _replace_tensor(tensors[key], new_value.to(tensors[key].device, copy=True))
        _write_scalings(modules, plan, adapter_name)
    _record_loaded_config(scan.root, modules, plan, adapter_name)


def _replace_tensor(old: torch.Tensor, new: torch.Tensor) -> None:
    try:
        torch.utils.swap_tensors(old, new)
    except RuntimeError:
        # swap_tensors refuses tensors that have weakrefs; rebinding the data is PEFT's fallback too
        old.data = new.data


def _write_scalings(modules: Mapping[str, nn.Module], plan: SwapPlan, adapter_name: str) -> None:
    targets, values = [], []
    for path, module in modules.items():
        scaling = plan.layers[path][2]
        current = module.scaling[adapter_name]
        if isinstance(current, torch.Tensor):
            targets.append(current)
            values.append(torch.tensor(scaling, dtype=current.dtype))
        elif current != scaling:
            module.scaling[adapter_name] = scaling
    if targets:
        torch._foreach_copy_(targets, values)


def _record_loaded_config(root: nn.Module, modules: Mapping[str, nn.Module], plan: SwapPlan, adapter_name: str) -> None:
    """Make ``peft_config`` and the layers' r/lora_alpha describe the incoming adapter (PEFT issue 3581)."""
    for path, module in modules.items():
        rank, alpha, _ = plan.layers[path]
        if isinstance(getattr(module, "r", None), dict) and adapter_name in module.r:
            module.r[adapter_name] = rank
            module.lora_alpha[adapter_name] = int(alpha) if float(alpha).is_integer() else alpha
    peft_config = getattr(root, "peft_config", None)
    if not isinstance(peft_config, dict) or adapter_name not in peft_config or plan.config is None:
        return
    loaded = peft_config[adapter_name]
    if loaded is plan.config or not isinstance(plan.config, LoraConfig):
        return
    loaded.r = plan.config.r
    loaded.lora_alpha = plan.config.lora_alpha
    loaded.rank_pattern = dict(plan.config.rank_pattern or {})


def _base_prefix(root: nn.Module) -> str:
    """What a LoRA module's path starts with before its name in the base model, which rank_pattern keys match."""
    if isinstance(root, PeftModel):
        return "base_model.model."
    if isinstance(root, BaseTuner):
        return "model."
    return ""


def _lora_module_path(key: str, adapter_name: str, parameter_prefix: str) -> str | None:
    """``'m.lin0.lora_A.default.weight'`` -> ``'m.lin0'``; ``'m.emb.lora_embedding_A.default'`` -> ``'m.emb'``."""
    parts = key.split(".")
    for index in range(len(parts) - 1, 0, -1):
        if parts[index] == adapter_name and parameter_prefix in parts[index - 1]:
            return ".".join(parts[: index - 1])
    return None


def _config_rank_and_alpha(config: Any, module_name: str) -> tuple[int, float]:
    """The rank and alpha ``config`` gives ``module_name`` (its name in the base model), patterns applied."""
    return layer_rank_and_alpha(
        {
            "r": getattr(config, "r", 8),
            "lora_alpha": getattr(config, "lora_alpha", 8),
            "rank_pattern": getattr(config, "rank_pattern", None) or {},
            "alpha_pattern": getattr(config, "alpha_pattern", None) or {},
        },
        module_name,
    )
