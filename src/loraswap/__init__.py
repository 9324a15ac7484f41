"""Hot-swap LoRA adapters in a ``torch.compile``d model without ever recompiling.

Importing loraswap imports torch, safetensors and numpy only, and changes nothing in the process (no environment
variable, no global setting). ``loraswap.diffusers``, ``loraswap.peft`` and ``loraswap.serve`` need their extras
and are imported on first use.
"""

from .adapter import Adapter, LayerLora, load_adapter
from .attach import attach
from .capacity import Capacity
from .compile_guard import CompileCounter, no_recompile
from .errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    AttachOrderError,
    CapacityError,
    DoraStrengthError,
    HotswapError,
    LayoutChangedError,
    ModeError,
    NonFiniteError,
    PickleRefusedError,
    RecompileError,
    ShapeMismatchError,
    ShardingError,
    SlotError,
    UnsupportedAdapterError,
)
from .folder import AdapterFolder
from .fused import FusedSlots
from .info import AdapterInfo, inspect
from .pool import AdapterPool, PoolSlots
from .swap import AdapterSlots

__version__ = "0.1.0"

_INTEGRATIONS = ("diffusers", "peft", "serve")  # need optional extras: imported on first use


def __getattr__(name: str):
    if name in _INTEGRATIONS:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'loraswap' has no attribute {name!r}")


__all__ = [
    "Adapter",
    "AdapterFolder",
    "AdapterFormatError",
    "AdapterInfo",
    "AdapterPool",
    "AdapterNotFoundError",
    "AdapterSlots",
    "AttachOrderError",
    "Capacity",
    "CapacityError",
    "DoraStrengthError",
    "CompileCounter",
    "FusedSlots",
    "HotswapError",
    "LayerLora",
    "LayoutChangedError",
    "ModeError",
    "NonFiniteError",
    "PickleRefusedError",
    "PoolSlots",
    "RecompileError",
    "ShapeMismatchError",
    "ShardingError",
    "SlotError",
    "UnsupportedAdapterError",
    "attach",
    "inspect",
    "load_adapter",
    "no_recompile",
]
