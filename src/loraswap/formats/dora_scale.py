"""kohya/LyCORIS/OneTrainer ``dora_scale``: which weight axis a stored scale indexes, from shapes alone.

One check for the pipeline reader (``loraswap.diffusers``) and for ``inspect``, so the two agree. Output axis,
shape ``(out, 1[, 1, 1])`` (LyCORIS' default since 3.2; PEFT's math): served. Input axis, shape ``(1, in[, 1, 1])``
(LyCORIS 2.2-3.1 ``dora_wd``, OneTrainer's default): refused by name. A squeezed 1-D scale on a square weight:
refused by name unless the header names the axis (LyCORIS ``wd_on_output``). Any other shape: refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from ..errors import AdapterFormatError, UnsupportedAdapterError

SUFFIX = ".dora_scale"


def check_dora_scales(label: str, shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str]) -> dict[str, int]:
    """``{kohya module: out}`` for every output-axis ``dora_scale`` among ``shapes`` (key -> shape, e.g. a header);
    raises for a scale without its pair, on the input axis, ambiguous, or of a shape neither axis has."""
    on_output = wd_on_output(metadata)
    modules = {}
    for key in sorted(key for key in shapes if key.endswith(SUFFIX)):
        module = key[: -len(SUFFIX)]
        down, up = shapes.get(f"{module}.lora_down.weight"), shapes.get(f"{module}.lora_up.weight")
        if down is None or up is None or len(down) < 2:
            raise AdapterFormatError(f"{label}: {key} has no lora_down/lora_up pair beside it; the file is incomplete")
        check_axis(label, key, tuple(shapes[key]), int(up[0]), int(down[1]), on_output)
        modules[module] = int(up[0])
    return modules


def check_axis(label: str, key: str, shape: tuple[int, ...], out: int, fan_in: int, on_output: bool | None) -> None:
    """Raise unless ``shape`` is an output-axis scale of a layer with ``out`` outputs and ``fan_in`` inputs."""
    if len(shape) == 1:
        axis = {(True, False): "output", (False, True): "input"}.get((shape[0] == out, shape[0] == fan_in))
        if axis is None and shape[0] == out == fan_in:
            axis = {True: "output", False: "input"}.get(on_output)
            if axis is None:
                raise UnsupportedAdapterError(
                    f"{label}: DoRA in kohya/LyCORIS form, a squeezed 1-D dora_scale on a square weight (key {key!r}, "
                    f"shape {list(shape)}) cannot be hot-swapped: it may index the output or the input axis and the "
                    "header does not say (LyCORIS metadata wd_on_output); re-save it with its 2-D shape, or add that "
                    "metadata"
                )
    elif len(shape) >= 2 and shape[0] == out and all(size == 1 for size in shape[1:]):
        axis = "output"
    elif len(shape) >= 2 and shape[0] == 1 and shape[1] == fan_in:
        axis = "input"
    else:
        axis = None
    if axis == "input":
        raise UnsupportedAdapterError(
            f"{label}: DoRA in kohya/LyCORIS form on the input axis (key {key!r}, shape {list(shape)}) cannot be "
            "hot-swapped: it rescales the layer's input per column (LyCORIS 2.2-3.1 dora_wd, OneTrainer's default), "
            "which loraswap does not serve yet; re-train or convert it with the output-axis convention (LyCORIS "
            "wd_on_output=True, dora_scale of shape (out, 1))"
        )
    if axis is None:
        raise UnsupportedAdapterError(
            f"{label}: DoRA in kohya/LyCORIS form with a dora_scale of shape {list(shape)} (key {key!r}) cannot be "
            f"hot-swapped: it fits neither the output axis ({out}) nor the input axis ({fan_in}) of its layer; the "
            "file is corrupt or from an unknown trainer: re-export it"
        )


def wd_on_output(metadata: Mapping[str, str]) -> bool | None:
    """LyCORIS' ``wd_on_output`` from the header (a top-level entry or in ``ss_network_args``), if any."""
    try:
        args = json.loads(metadata.get("ss_network_args", "{}"))
    except json.JSONDecodeError:
        args = {}
    for raw in (metadata.get("wd_on_output"), args.get("wd_on_output") if isinstance(args, dict) else None):
        if raw is not None:
            return str(raw).lower() in ("true", "1")
    return None
