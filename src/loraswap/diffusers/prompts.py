"""A pipeline call's rows: per-prompt routing and per-call LoRA strength, laid out for each component.

The caller routes prompts (``PipelineSlots.route(ids)`` / ``blend(rows)``, one entry per prompt);
each component sees its own batch for them:

- text encoders encode each prompt once (the negative prompts in a second call of the same size):
  row ``i`` is prompt ``i``;
- the denoiser (unet, transformer, transformer_2) sees ``num_images_per_prompt`` rows per prompt,
  prompt-major, and, in pipelines that batch classifier-free guidance (``torch.cat([latents] * 2)``:
  Stable Diffusion 1.5/XL/3 and most others), the unconditional block before the conditional one.
  Pipelines that call the denoiser once per guidance branch (Flux, Wan, QwenImage) see one block.

The strength a call passes the diffusers way (``cross_attention_kwargs={"scale": s}``,
``joint_attention_kwargs``, ``attention_kwargs``) multiplies every routing weight, text encoders
included, as diffusers scales its text-encoder LoRA layers by the same ``lora_scale``. The scale is
taken out of the kwargs before the pipeline runs: inside a compiled forward it would be a Python
float that dynamo guards on, so each new strength would recompile.

:func:`route_calls` makes ``pipe(...)`` do this: the pipeline instance's class becomes a subclass of
the same name whose ``__call__`` lays out the rows, then calls the pipeline's own ``__call__``.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import SlotError
from ..routing import BlendWeights

SCALE_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")
PER_PROMPT_KWARGS = ("num_images_per_prompt", "num_videos_per_prompt")
# what a pipeline that batches both guidance branches into one denoiser call writes
BATCHED_GUIDANCE = re.compile(r"\[\s*(latents|latent_model_input)\s*\]\s*\*\s*2")


@dataclass(frozen=True)
class CallLayout:
    """How one pipeline call batches its prompts: ``prompts`` x ``per_prompt`` rows per guidance block."""

    prompts: int
    per_prompt: int = 1
    guidance_blocks: int = 1
    scale: float = 1.0


def component_rows(
    rows: BlendWeights | Sequence[BlendWeights], layout: CallLayout, denoiser: bool
) -> BlendWeights | list[BlendWeights]:
    """The per-prompt ``rows`` (or one mapping for every row) as a component's batch sees them, scaled."""
    if isinstance(rows, Mapping):
        return _scaled(rows, layout.scale)
    if len(rows) != layout.prompts:
        raise SlotError(
            f"routing holds {len(rows)} entries but the pipeline call has {layout.prompts} prompt(s); "
            "route (or blend) one entry per prompt before each call"
        )
    scaled = [_scaled(row, layout.scale) for row in rows]
    if not denoiser:
        return scaled
    block = [row for row in scaled for _ in range(layout.per_prompt)]
    return block * layout.guidance_blocks


def _scaled(row: BlendWeights, scale: float) -> dict[int, float]:
    return {slot: float(weight) * scale for slot, weight in row.items()}


def call_layout(pipe: Any, call: Callable, args: tuple, kwargs: dict) -> tuple[CallLayout, tuple, dict]:
    """The layout of ``call(*args, **kwargs)`` and the arguments to run it with, the LoRA scale taken out."""
    try:
        bound = inspect.signature(call).bind(*args, **kwargs)
    except TypeError:
        return CallLayout(prompts=1), args, kwargs  # the pipeline raises its own error for these
    arguments = bound.arguments
    scale = 1.0
    for name in SCALE_KWARGS:
        if isinstance(arguments.get(name), Mapping) and "scale" in arguments[name]:
            scale, arguments[name] = split_scale(arguments[name])
    per_prompt = next((arguments[name] for name in PER_PROMPT_KWARGS if arguments.get(name)), 1)
    layout = CallLayout(
        prompts=_prompt_count(arguments),
        per_prompt=int(per_prompt),
        guidance_blocks=2 if batches_guidance(type(pipe)) and _guides(pipe, call, arguments) else 1,
        scale=scale,
    )
    return layout, bound.args, bound.kwargs


def split_scale(options: Any) -> tuple[float, Any]:
    """``(scale, the options without it)`` from a ``cross_attention_kwargs``-style dict (``(1.0, options)`` without
    one). Options left empty become None, what a call without the scale passes: the same compiled graph runs."""
    if not isinstance(options, Mapping) or "scale" not in options:
        return 1.0, options
    rest = {key: value for key, value in options.items() if key != "scale"}
    return float(options["scale"]), rest or None


def _prompt_count(arguments: Mapping[str, Any]) -> int:
    prompt = arguments.get("prompt")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, Sequence):
        return len(prompt)
    embeds = arguments.get("prompt_embeds")
    return int(embeds.shape[0]) if embeds is not None else 1


@functools.cache
def batches_guidance(pipeline_class: type) -> bool:
    """Whether the pipeline's denoising loop runs both guidance branches in one denoiser batch."""
    for cls in pipeline_class.__mro__:
        if "__call__" in vars(cls) and cls.__module__.startswith("diffusers."):
            return bool(BATCHED_GUIDANCE.search(inspect.getsource(inspect.getmodule(cls))))
    return False


def _guides(pipe: Any, call: Callable, arguments: Mapping[str, Any]) -> bool:
    """The pipeline's own ``do_classifier_free_guidance`` for this call's ``guidance_scale``."""
    guidance_scale = arguments.get("guidance_scale", _default(call, "guidance_scale"))
    if guidance_scale is None:
        return False
    if not isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
        return guidance_scale > 1
    previous = pipe.__dict__.get("_guidance_scale", _MISSING)
    pipe.__dict__["_guidance_scale"] = guidance_scale
    try:
        return bool(pipe.do_classifier_free_guidance)
    finally:
        if previous is _MISSING:
            del pipe.__dict__["_guidance_scale"]
        else:
            pipe.__dict__["_guidance_scale"] = previous


_MISSING = object()


def _default(call: Callable, name: str) -> Any:
    parameter = inspect.signature(call).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def route_calls(pipe: Any, on_call: Callable[[Callable, tuple, dict], Any]) -> None:
    """Make ``pipe(...)`` run ``on_call(pipeline_call, args, kwargs)``, for this pipeline instance only.

    The instance's class becomes a subclass of the same name and module whose ``__call__`` does
    that (other instances and the class itself are untouched; ``isinstance`` holds).
    """
    cls = type(pipe)
    if not getattr(cls, "_loraswap_routed", False):
        object.__setattr__(pipe, "__class__", _routed_class(cls))
    pipe.__dict__["_loraswap_on_call"] = on_call


@functools.cache
def _routed_class(cls: type) -> type:
    def __call__(self, *args, **kwargs):
        return self.__dict__["_loraswap_on_call"](super(routed, self).__call__, args, kwargs)

    attributes = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    routed = type(cls.__name__, (cls,), {**attributes, "__doc__": cls.__doc__, "_loraswap_routed": True})
    return routed
