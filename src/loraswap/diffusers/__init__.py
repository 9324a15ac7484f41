"""loraswap for diffusers pipelines: every LoRA-loadable component, text encoders included.

- :mod:`.reading`: a LoRA file, hub id or state dict, read as ``pipe.load_lora_weights`` reads it
  (diffusers' converters), split per component into normalised :class:`~loraswap.Adapter` s.
- :mod:`.pipeline`: :func:`attach` and :class:`PipelineSlots` / :class:`FusedPipelineSlots`, the
  :class:`~loraswap.AdapterSlots` verbs over every component at once, transactional across them.
- :mod:`.prompts`: a pipeline call's rows per component (per-prompt routing, guidance, per-call scale).
- :mod:`.dropin` (pipelines) and :mod:`.model` (``ModelMixin`` models): :func:`enable_lora_hotswap`,
  diffusers' LoRA methods routed to loraswap on one instance; :mod:`.naming`: what both share.
- :mod:`.patch`: :func:`patch`, diffusers' own ``enable_lora_hotswap`` routed to loraswap.
"""

from .dropin import DEFAULT_TEXT_ENCODER_TARGETS, PipelineHotswap, enable_lora_hotswap
from .model import DEFAULT_DENOISER_TARGETS, ModelHotswap, enable_model_lora_hotswap
from .patch import is_patched, patch, unpatch
from .pipeline import FusedPipelineSlots, PackedPipelineAdapter, PipelineSlots, attach, capacities_for
from .reading import (
    HUB_DOWNLOAD_KWARGS,
    PipelineAdapter,
    PipelineSource,
    component_adapter,
    is_text_encoder,
    lora_components,
    read_pipeline_adapter,
    resolve_hub_id,
)

__all__ = [
    "ModelHotswap",
    "PipelineHotswap",
    "enable_model_lora_hotswap",
    "is_patched",
    "patch",
    "unpatch",
    "DEFAULT_DENOISER_TARGETS",
    "DEFAULT_TEXT_ENCODER_TARGETS",
    "HUB_DOWNLOAD_KWARGS",
    "FusedPipelineSlots",
    "PackedPipelineAdapter",
    "PipelineAdapter",
    "PipelineSlots",
    "PipelineSource",
    "attach",
    "capacities_for",
    "component_adapter",
    "enable_lora_hotswap",
    "is_text_encoder",
    "lora_components",
    "read_pipeline_adapter",
    "resolve_hub_id",
]
