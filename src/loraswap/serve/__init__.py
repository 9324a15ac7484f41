"""The serving layer: adapter ids over a few slots (:class:`AdapterPool`), a folder of adapters by name, and an
OpenAI-compatible server on Ray Serve (``build_app``).

Importing this package before ``ray`` keeps Ray on loopback (see :mod:`loraswap.serve.ray_local`).
"""

import os

from .folder import AdapterFolder
from .pool import AdapterPool

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def __getattr__(name: str):
    if name == "build_app":  # imports ray and fastapi: only when asked for
        from .app import build_app

        return build_app
    raise AttributeError(f"module 'loraswap.serve' has no attribute {name!r}")


__all__ = ["AdapterFolder", "AdapterPool", "build_app"]
