"""PEFT's hotswap API as a drop-in: change ``from peft.utils.hotswap import ...`` to ``from loraswap.peft import ...``.

The three functions keep PEFT 0.21's signatures, defaults, exception types and messages, and work on
``PeftModel``s (compiled or not) and on diffusers models that carry PEFT LoRA layers. The model keeps
PEFT's own LoRA layers: ``prepare_model_for_compiled_hotswap`` pads their ``lora_A``/``lora_B`` and
turns their scalings into tensors, as PEFT does. Where loraswap differs, PEFT's observable behaviour
is kept for everything PEFT accepts:

- a swap is transactional: everything PEFT would check while it swaps is checked first, in PEFT's
  order, on fresh tensors, so a swap that PEFT would abandon halfway raises the same exception (type
  and message) and leaves every tensor of the model bit-for-bit as it was.
  ``prepare_model_for_compiled_hotswap`` likewise builds every padded layer before it installs any;
- an adapter's keys are those whose component after the ``lora_*`` container is exactly the adapter
  name, so swapping ``foo`` never zeroes ``foobar`` (PEFT issue 3780);
- ``rank_pattern``/``alpha_pattern`` are matched against the module's name in the base model, as
  PEFT matches them when it builds the layer, not against the parameter key (PEFT issue 3738);
- after a swap, ``peft_config[adapter_name]`` and each layer's ``r``/``lora_alpha`` hold the
  incoming adapter's ``r``, ``lora_alpha`` and ``rank_pattern``, where PEFT keeps the first
  adapter's (issue 3581); ``alpha_pattern`` is already equal: PEFT's compatibility check requires it;
- ``hotswap_adapter`` keeps each adapter it read from a local directory in a host cache, laid out
  for the model's tensors: a repeated swap is one ``torch._foreach_copy_`` and reads nothing from
  disk. Entries are keyed by the files' size and modification time and by the shapes of the model's
  LoRA tensors, so a changed file or a changed model is read again. Hub ids are read by PEFT each time.

Only new keyword arguments add behaviour, and their defaults keep PEFT's: ``target_modules`` of
``prepare_model_for_compiled_hotswap`` gives layers the first adapter did not target a zero LoRA of
``target_rank``, so that later adapters may target them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Literal
from weakref import WeakKeyDictionary

import torch
from peft import PeftModel
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
from peft.tuners.lora import Conv2d as LoraConv2d
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import infer_device, load_peft_weights
from peft.utils.peft_types import PeftType
from torch import nn

from .cache import AdapterCache, cache_key, default_cache_bytes
from .capacity import target_matches
from .formats.locate import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME
from .formats.lora_keys import layer_rank_and_alpha, lora_scaling

__all__ = [
    "check_hotswap_configs_compatible",
    "clear_hotswap_cache",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
]

# the config keys PEFT requires equal between the loaded and the incoming adapter (LoRA only)
CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}

# unwrapped model -> its host cache of swap plans; dies with the model
_CACHES: WeakKeyDictionary[nn.Module, AdapterCache] = WeakKeyDictionary()


# ------------------------------------------------------------------------------------------------
# prepare_model_for_compiled_hotswap
# ------------------------------------------------------------------------------------------------


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


def _copy_rank_blocks(destination: torch.Tensor, source: torch.Tensor, groups: int) -> None:
    """Copy ``source`` into a zero ``destination`` along dim 0, each of ``groups`` rank blocks at the start of its
    padded block: PEFT's layout for a grouped conv's lora_A, and a plain prefix copy when ``groups`` is 1."""
    destination_block = destination.shape[0] // groups
    source_block = source.shape[0] // groups
    for group in range(groups):
        start = group * destination_block
        destination[start : start + source_block].copy_(source[group * source_block : (group + 1) * source_block])


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


# ------------------------------------------------------------------------------------------------
# hotswap_adapter_from_state_dict
# ------------------------------------------------------------------------------------------------


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


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile``'s ``OptimizedModule`` wrapper."""
    return getattr(model, "_orig_mod", model)


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


# ------------------------------------------------------------------------------------------------
# hotswap_adapter
# ------------------------------------------------------------------------------------------------


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
            check_hotswap_configs_compatible(model.active_peft_config, plan.config)
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
    check_hotswap_configs_compatible(model.active_peft_config, config)
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
