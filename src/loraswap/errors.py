"""Every error loraswap raises on bad input is a :class:`HotswapError`.

Messages name the layer (or file), the offending value and the fix, so that a
failed swap in a serving log says what to change without a debugger.
"""

from __future__ import annotations


class HotswapError(Exception):
    """Base of every error loraswap raises on bad input."""


class AdapterNotFoundError(HotswapError, FileNotFoundError):
    """The path does not exist and is not a hub id that can be resolved."""


class AdapterFormatError(HotswapError, ValueError):
    """The adapter file or config cannot be read: truncated, invalid JSON, unknown keys."""


class UnsupportedAdapterError(HotswapError, ValueError):
    """The adapter uses a feature loraswap cannot hot-swap (LoHa, non-LoRA PEFT types, ...)."""


class PickleRefusedError(HotswapError, ValueError):
    """A pickled checkpoint (.bin) was given without ``allow_pickle=True``."""


class CapacityError(HotswapError, ValueError):
    """The adapter does not fit the capacity chosen at ``attach``: a target or rank outside it."""


class RankOverCapacityError(CapacityError):
    """A layer's rank exceeds the rank ``attach`` padded that layer to; ``layer``, ``rank`` and ``capacity_rank`` say which."""

    def __init__(self, message: str, layer: str, rank: int, capacity_rank: int) -> None:
        super().__init__(message)
        self.layer = layer
        self.rank = rank
        self.capacity_rank = capacity_rank


class ShapeMismatchError(HotswapError, ValueError):
    """A tensor's shape or dtype does not fit the layer it targets."""


class NonFiniteError(HotswapError, ValueError):
    """A tensor holds NaN or infinite values."""


class SlotError(HotswapError, IndexError):
    """A slot id, routing id or blend weight outside what ``attach`` allocated."""


class DoraStrengthError(SlotError):
    """A DoRA adapter read at a strength other than 0 or 1: its norm was computed at strength 1 (see loraswap.dora)."""

    param = "lora_scale"  # the request field a server names in its 400


class LayoutChangedError(HotswapError, RuntimeError):
    """The slot buffers no longer alias their flat storage (the model was moved, cast or quantized after ``attach``)."""


class AttachOrderError(HotswapError, RuntimeError):
    """``attach`` was given a model already wrapped by ``torch.compile``: attach first, then compile."""


class ModeError(HotswapError, RuntimeError):
    """The verb is not available in the mode chosen at ``attach``."""


class RecompileError(HotswapError, RuntimeError):
    """``torch.compile`` recompiled inside :func:`loraswap.no_recompile`."""


class ShardingError(HotswapError, ValueError):
    """A tensor-parallel (DTensor) sharding of a target layer that loraswap cannot attach to."""
