"""The opt-in patch for existing diffusers code: :func:`patch` makes diffusers' own ``enable_lora_hotswap``
route to loraswap, for the models and pipelines that call it.

Patched, on diffusers' classes (all other methods and classes stay diffusers'):

- ``diffusers.loaders.peft.PeftAdapterMixin.enable_lora_hotswap`` (every ``ModelMixin`` that loads
  LoRAs: UNet2DConditionModel, the Flux/Flux2/QwenImage/Chroma/SD3/Wan transformers, ...);
- ``diffusers.loaders.lora_base.LoraBaseMixin.enable_lora_hotswap`` (every pipeline with
  ``load_lora_weights``).

After ``patch()``, ``model.enable_lora_hotswap(target_rank=..., check_compiled=...)`` or
``pipe.enable_lora_hotswap(...)`` calls :func:`loraswap.diffusers.enable_lora_hotswap` on that instance,
which gives that instance loraswap-backed LoRA methods (``load_lora_adapter`` / ``load_lora_weights``,
``set_adapters``, ...; see :mod:`.model` and :mod:`.dropin`). A model or pipeline that never calls
``enable_lora_hotswap`` keeps diffusers' behaviour. :func:`unpatch` restores diffusers' methods;
instances already routed stay routed.
"""

from __future__ import annotations

from typing import Any

_ORIGINALS: dict[type, Any] = {}


def _patched_classes() -> tuple[type, ...]:
    from diffusers.loaders.lora_base import LoraBaseMixin
    from diffusers.loaders.peft import PeftAdapterMixin

    return PeftAdapterMixin, LoraBaseMixin


def patch() -> None:
    """Route diffusers' ``enable_lora_hotswap`` (models and pipelines) to loraswap; idempotent."""
    from .dropin import enable_lora_hotswap

    def routed_enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error", **options: Any):
        return enable_lora_hotswap(self, target_rank, check_compiled=check_compiled, **options)

    for cls in _patched_classes():
        if cls not in _ORIGINALS:
            _ORIGINALS[cls] = cls.__dict__["enable_lora_hotswap"]
            routed_enable_lora_hotswap.__doc__ = "loraswap's enable_lora_hotswap (patched by loraswap.diffusers.patch)"
            cls.enable_lora_hotswap = routed_enable_lora_hotswap


def unpatch() -> None:
    """Put diffusers' own ``enable_lora_hotswap`` back."""
    for cls, original in list(_ORIGINALS.items()):
        cls.enable_lora_hotswap = original
        del _ORIGINALS[cls]


def is_patched() -> bool:
    return bool(_ORIGINALS)
