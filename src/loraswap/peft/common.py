"""Small tensor helpers both halves of the drop-in share, and the one switch on the installed PEFT's version."""

from __future__ import annotations

from importlib.metadata import version

import torch
from packaging.version import Version
from torch import nn

PEFT_VERSION = Version(version("peft"))
# PEFT 0.22 checks an incoming config against the config of the adapter being swapped
# (``peft_config[adapter_name]``: KeyError for an unknown name); 0.21 against the active adapter's.
CHECKS_THE_SWAPPED_ADAPTER_S_CONFIG = PEFT_VERSION >= Version("0.22.0")


def loaded_config(model: nn.Module, adapter_name: str):
    """The config the installed PEFT compares an incoming adapter's with (see CHECKS_THE_SWAPPED_ADAPTER_S_CONFIG)."""
    if CHECKS_THE_SWAPPED_ADAPTER_S_CONFIG:
        return model.peft_config[adapter_name]
    return model.active_peft_config


def _copy_rank_blocks(destination: torch.Tensor, source: torch.Tensor, groups: int) -> None:
    """Copy ``source`` into a zero ``destination`` along dim 0, each of ``groups`` rank blocks at the start of its
    padded block: PEFT's layout for a grouped conv's lora_A, and a plain prefix copy when ``groups`` is 1."""
    destination_block = destination.shape[0] // groups
    source_block = source.shape[0] // groups
    for group in range(groups):
        start = group * destination_block
        destination[start : start + source_block].copy_(source[group * source_block : (group + 1) * source_block])


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile``'s ``OptimizedModule`` wrapper."""
    return getattr(model, "_orig_mod", model)
