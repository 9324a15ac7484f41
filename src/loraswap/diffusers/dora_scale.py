"""kohya/LyCORIS/OneTrainer DoRA (``<module>.dora_scale``) in pipeline files, read into PEFT's magnitude vectors.

diffusers 0.42.1's ``lora_state_dict`` deletes every ``dora_scale`` key (with a warning) before converting, so a
DoRA file would load as plain LoRA. Here the file's ``dora_scale`` tensors are taken out first and the rest goes
through diffusers' converters as usual; each scale is then given back to the layer whose ``lora_A`` *is* its
module's ``lora_down`` tensor (the converters move tensors, never copy them, as the kohya alphas rely on too),
rows sliced where a converter split a fused ``lora_up`` (Flux ``qkv``: an output-axis norm is per row, so a row
split stays exact). A layer whose tensors a converter rebuilt cannot be traced and is refused by name.

Which axis a scale indexes is decided from the stored shapes by :mod:`loraswap.formats.dora_scale` (the check
``inspect`` runs too): only the output axis is served.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import HotswapError, UnsupportedAdapterError
from ..formats.dora_scale import SUFFIX, check_dora_scales
from ..formats.safetensors import open_safetensors, read_safetensors_header


def take_dora_scales(source: Any, label: str) -> tuple[Any, dict[int, tuple[str, torch.Tensor, torch.Tensor]]]:
    """``(source without its dora_scale keys, {id(lora_down): (module, lora_up, magnitude [out])})``.

    ``source`` comes back unchanged when it holds no ``dora_scale`` key; otherwise as a state dict (the file read
    once here, the same tensors then handed to diffusers). Raises for an input-axis or ambiguous scale."""
    tensors, metadata = _tensors(source)
    if tensors is None or not any(key.endswith(SUFFIX) for key in tensors):
        return source, {}
    outputs = check_dora_scales(label, {key: tuple(value.shape) for key, value in tensors.items()}, metadata)
    scales = {}
    for module, out in outputs.items():
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        scales[id(down)] = (module, up, tensors[module + SUFFIX].reshape(out))
    return {key: value for key, value in tensors.items() if not key.endswith(SUFFIX)}, scales


def with_magnitudes(
    peft_state_dict: dict[str, torch.Tensor],
    scales: Mapping[int, tuple[str, torch.Tensor, torch.Tensor]],
    label: str,
    traced: set[int],
) -> dict[str, torch.Tensor]:
    """Add ``<layer>.lora_magnitude_vector`` to every converted layer whose ``lora_A`` is a DoRA module's down;
    record the downs found in ``traced`` (:func:`check_all_traced` then refuses a scale no layer took)."""
    if not scales:
        return peft_state_dict
    for key, tensor in list(peft_state_dict.items()):
        if not key.endswith(".lora_A.weight") or id(tensor) not in scales:
            continue
        layer = key[: -len(".lora_A.weight")]
        module, up, magnitude = scales[id(tensor)]
        lora_B = peft_state_dict.get(f"{layer}.lora_B.weight")
        rows = _rows_of(lora_B, up)
        if rows is None:
            raise UnsupportedAdapterError(
                f"{label}: DoRA in kohya/LyCORIS form (dora_scale of {module!r}) cannot be traced to layer {layer!r}: "
                "diffusers' converter rebuilt its lora_up, so which output rows the magnitude belongs to is unknown; "
                "convert the file to PEFT's lora_magnitude_vector layout"
            )
        peft_state_dict[f"{layer}.lora_magnitude_vector"] = magnitude[rows]
        traced.add(id(tensor))
    return peft_state_dict


def check_all_traced(scales: Mapping[int, tuple[str, torch.Tensor, torch.Tensor]], traced: set[int], label: str) -> None:
    """Refuse a ``dora_scale`` that reached no layer: the converter rebuilt its module's tensors (kohya Flux scales
    them by alpha), so the file would otherwise load as plain LoRA."""
    missing = sorted(module for down, (module, _, _) in scales.items() if down not in traced)
    if missing:
        raise UnsupportedAdapterError(
            f"{label}: DoRA in kohya/LyCORIS form (dora_scale of {missing[0]!r}, {len(missing)} module(s)) cannot be "
            "hot-swapped from this layout: diffusers' converter rebuilds those modules' tensors (kohya Flux files are "
            "rescaled by alpha), so the magnitudes cannot be traced to their layers; convert the file to PEFT's "
            "lora_magnitude_vector layout"
        )


def _rows_of(lora_B: torch.Tensor | None, up: torch.Tensor) -> slice | None:
    """The rows of ``up`` that ``lora_B`` is: all of it, or the slice a split (a view of its storage) took."""
    if lora_B is None:
        return None
    if lora_B is up:
        return slice(0, up.shape[0])
    same_storage = lora_B.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()
    if not same_storage or lora_B.stride(0) != up.stride(0) or lora_B.shape[1:] != up.shape[1:]:
        return None
    start, extra = divmod(lora_B.storage_offset() - up.storage_offset(), up.stride(0))
    return None if extra or start < 0 else slice(start, start + lora_B.shape[0])


def _tensors(source: Any) -> tuple[dict[str, torch.Tensor] | None, Mapping[str, str]]:
    """A state dict and its metadata: the mapping itself, or a lone safetensors file read whole when its header
    names a ``dora_scale`` (None otherwise, and for a file the header check refuses: the usual path reports it)."""
    if isinstance(source, Mapping):
        return dict(source), {}
    path = Path(source).expanduser() if isinstance(source, (str, Path)) else None
    if path is None or path.suffix != ".safetensors" or not path.is_file():
        return None, {}
    try:
        header = read_safetensors_header(path)
    except HotswapError:
        return None, {}
    if not any(key.endswith(SUFFIX) for key in header.tensors):
        return None, {}
    with open_safetensors(path) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, header.metadata
