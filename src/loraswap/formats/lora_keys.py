"""The key families of LoRA files and the rules that turn a config into a layer's scaling.

Families, told apart by their key names (:func:`detect_format`):

- PEFT: ``<module>.lora_A.weight`` / ``.lora_B.weight`` (``lora_embedding_A``/``_B`` for embeddings,
  ``.lora_B.bias`` for a LoRA bias), module names under ``base_model.model.``; a directory with
  ``adapter_config.json`` or a lone file (its LoraConfig, if any, in the header's ``lora_adapter_metadata``).
  ``load_adapter`` reads this family.
- diffusers: PEFT keys under a pipeline component (``unet.``, ``transformer.``, ``text_encoder.``, ...), or the
  legacy ``.lora.down.weight`` / ``.lora_linear_layer.up.weight`` / ``to_q_lora.down.weight`` names;
- kohya/LyCORIS (A1111): ``lora_unet_*`` / ``lora_te*_*`` prefixes with ``lora_down``/``lora_up`` and per-layer
  ``alpha`` tensors;
- XLabs (Flux): ``double_blocks.<i>.processor.qkv_lora1.down.weight``.
  These three load through ``loraswap.diffusers`` (diffusers' own converters).

Scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with PEFT's ``rank_pattern`` / ``alpha_pattern``
applied per module; a per-layer ``alpha`` tensor wins over the config, and a file with neither has scaling 1
(diffusers' meaning of an alpha-less file). ``inspect`` and ``load_adapter`` both use these functions, so
they name, group and scale layers the same way.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import AdapterFormatError
from .support import BASE_LAYER_WEIGHT, key_feature

PEFT_PREFIX = "base_model.model."

FORMAT_PEFT_DIR = "peft-dir"
FORMAT_PEFT_FILE = "peft-safetensors"
FORMAT_DIFFUSERS = "diffusers"
FORMAT_KOHYA = "kohya"
FORMAT_XLABS = "xlabs"
PEFT_FORMATS = (FORMAT_PEFT_DIR, FORMAT_PEFT_FILE)

# Key suffix -> role, per key family. Longer suffixes first where one ends another.
PEFT_SUFFIXES = (
    (".lora_A.weight", "lora_A"),
    (".lora_B.weight", "lora_B"),
    (".lora_B.bias", "lora_bias"),
    (".lora_embedding_A", "lora_A"),
    (".lora_embedding_B", "lora_B"),
    (".lora_magnitude_vector", "magnitude"),  # DoRA (PEFT's saved key drops the adapter name and ".weight")
    (BASE_LAYER_WEIGHT, "base_weight"),
)
KOHYA_SUFFIXES = (
    (".lora_down.weight", "lora_A"),
    (".lora_up.weight", "lora_B"),
)
# XLabs Flux files: double_blocks.<i>.processor.qkv_lora1.down.weight (diffusers splits qkv into q, k, v)
XLABS_SUFFIXES = (
    (".down.weight", "lora_A"),
    (".up.weight", "lora_B"),
)
LEGACY_DIFFUSERS_SUFFIXES = (
    (".lora_linear_layer.down.weight", "lora_A"),
    (".lora_linear_layer.up.weight", "lora_B"),
    (".lora.down.weight", "lora_A"),
    (".lora.up.weight", "lora_B"),
    ("_lora.down.weight", "lora_A"),
    ("_lora.up.weight", "lora_B"),
)
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_te_": "text_encoder",
    "lora_transformer_": "transformer",
}
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")


def split_key(key: str, suffixes=PEFT_SUFFIXES) -> tuple[str, str | None]:
    """``(module, role)`` of a key by the family's ``suffixes`` (``alpha`` for ``<module>.alpha``); role None
    for a key the family does not name."""
    for suffix, role in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    return key, None


def split_lora_key(key: str) -> tuple[str, str]:
    """``'base_model.model.x.q_proj.lora_A.weight'`` -> ``('x.q_proj', 'lora_A')``; raises for a non-PEFT key."""
    module, role = split_key(key.removeprefix(PEFT_PREFIX))
    if role is not None:
        return module, role
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
    """PEFT keys: module name -> {role: key}, checking every module has both A and B."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        module, role = split_lora_key(key)
        if role != "base_weight":
            modules.setdefault(module, {})[role] = key
    check_pairs_complete(modules, source)
    if not modules:
        raise AdapterFormatError(f"{source}: no LoRA tensors found; is this a LoRA adapter?")
    return modules


def detect_format(keys) -> str | None:
    """``kohya``, ``xlabs``, ``diffusers`` or ``peft-safetensors`` from the key names; None for no LoRA keys at all."""
    keys = list(keys)
    if any(key.startswith(tuple(KOHYA_PREFIXES)) or key.endswith(".lora_down.weight") for key in keys):
        return FORMAT_KOHYA
    if any(".processor." in key and key.endswith(".down.weight") for key in keys):
        return FORMAT_XLABS
    if any(key.endswith(suffix) for key in keys for suffix, _ in LEGACY_DIFFUSERS_SUFFIXES):
        return FORMAT_DIFFUSERS
    peft_keys = [key for key in keys if split_key(key)[1] in ("lora_A", "lora_B")]
    if not peft_keys:
        return None
    if any(key.split(".", 1)[0] in DIFFUSERS_COMPONENTS for key in peft_keys):
        return FORMAT_DIFFUSERS
    return FORMAT_PEFT_FILE


def group_keys(keys: Iterable[str], file_format: str, source: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Any family: module name -> {role: key} (layers with both A and B checked), and a note on keys that are
    neither LoRA tensors nor a known feature's (those :func:`~loraswap.formats.support.find_unsupported` names)."""
    suffixes = {
        FORMAT_KOHYA: KOHYA_SUFFIXES + LEGACY_DIFFUSERS_SUFFIXES,
        FORMAT_XLABS: XLABS_SUFFIXES,
        FORMAT_DIFFUSERS: LEGACY_DIFFUSERS_SUFFIXES + PEFT_SUFFIXES,
    }.get(file_format, PEFT_SUFFIXES)
    modules: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in keys:
        if key_feature(key) is not None:
            continue  # named by support.find_unsupported
        module, role = split_key(key, suffixes)
        if role is None:
            unknown.append(key)
        elif role != "base_weight":
            if file_format in PEFT_FORMATS and module.startswith(PEFT_PREFIX):
                module = module[len(PEFT_PREFIX) :]
            modules.setdefault(module, {})[role] = key
    notes = [f"{len(unknown)} key(s) that are not LoRA tensors, e.g. {unknown[0]!r}"] if unknown else []
    lora_modules = {name: roles for name, roles in modules.items() if roles.keys() & {"lora_A", "lora_B"}}
    check_pairs_complete(lora_modules, source)
    return lora_modules, notes


def key_component(module: str, file_format: str) -> str | None:
    """The pipeline component a module of a pipeline file belongs to (None for a whole-model PEFT file)."""
    if file_format == FORMAT_KOHYA:
        return next((name for prefix, name in KOHYA_PREFIXES.items() if module.startswith(prefix)), None)
    if file_format == FORMAT_XLABS:
        return "transformer"
    if file_format == FORMAT_DIFFUSERS:
        first = module.split(".", 1)[0]
        return first if first in DIFFUSERS_COMPONENTS else None
    return None


def module_kind(module: str, file_format: str) -> str:
    """The short layer name a target list would use: ``q_proj``, ``to_out.0``, kohya's ``attn1_to_q``."""
    if file_format == FORMAT_KOHYA:
        return re.split(r"_\d+_", module)[-1]
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


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


def config_rank_mismatch(source: str, module: str, rank: int, config_rank: int) -> AdapterFormatError:
    """The error for tensors whose rank is not the one the config gives the layer."""
    return AdapterFormatError(
        f"{source}: layer {module!r} has rank {rank} in its tensors but {config_rank} in the config "
        "(r / rank_pattern); the config does not belong to these weights"
    )


def dora_magnitudes_missing(source: str, missing: list[str]) -> AdapterFormatError:
    """The error for a ``use_dora`` config whose layers lack ``lora_magnitude_vector`` (PEFT would train-init them)."""
    return AdapterFormatError(
        f"{source}: the config says use_dora=True but layer {missing[0]!r} has no lora_magnitude_vector "
        f"({len(missing)} layer(s) lack one); the file is incomplete: re-save the DoRA adapter with PEFT"
    )


def ranks_disagree(source: str, module: str, a_shape, b_shape) -> AdapterFormatError:
    """The error for a layer whose ``lora_A`` and ``lora_B`` ranks disagree."""
    return AdapterFormatError(
        f"{source}: layer {module!r} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, "
        "whose ranks disagree; the file is corrupt"
    )


def read_config(path: Path) -> dict[str, Any]:
    """An ``adapter_config.json``, checked to be a JSON object."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"{path}: cannot read the adapter config ({err})") from err
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{path}: invalid JSON at line {err.lineno} ({err.msg}); fix or re-save it") from err
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: the adapter config is not a JSON object")
    return config


def metadata_config(metadata: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    """The LoraConfig diffusers writes into a safetensors header as ``lora_adapter_metadata`` (None without)."""
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


def component_configs(config: Mapping[str, Any] | None, metadata: Mapping[str, str], path: Path) -> dict[str, dict]:
    """Component (``""`` for a whole-model PEFT file) -> its LoraConfig dict, from adapter_config.json or
    diffusers' ``lora_adapter_metadata`` header entry (flat keys like ``unet.r``)."""
    if config is not None:
        return {"": dict(config)}
    packed = metadata_config(metadata, path)
    if packed is None:
        return {}
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, option = key.partition(".")
        if component in DIFFUSERS_COMPONENTS and option:
            configs.setdefault(component, {})[option] = value
        else:
            configs.setdefault("", {})[key] = value
    return configs
