"""The serving layer: adapter ids over a few slots (:class:`AdapterPool`), a folder of adapters by name."""

from .folder import AdapterFolder
from .pool import AdapterPool

__all__ = ["AdapterFolder", "AdapterPool"]
