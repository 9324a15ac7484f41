"""loraswap for diffusers pipelines: every LoRA-loadable component, text encoders included.

- :mod:`.reading`: a LoRA file, hub id or state dict, read as ``pipe.load_lora_weights`` reads it
  (diffusers' converters), split per component into normalised :class:`~loraswap.Adapter` s.
- :mod:`.pipeline`: :func:`attach` and :class:`PipelineSlots` / :class:`FusedPipelineSlots`, the
  :class:`~loraswap.AdapterSlots` verbs over every component at once, transactional across them.
- :mod:`.dropin`: :func:`enable_lora_hotswap`, diffusers' own hotswap API routed to loraswap.
"""

from .dropin import DEFAULT_DENOISER_TARGETS, DEFAULT_TEXT_ENCODER_TARGETS, enable_lora_hotswap
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
