"""The serving layer: adapter ids over a few slots (:class:`AdapterPool`), a folder of adapters by name, and an
OpenAI-compatible server on Ray Serve (``build_app``).

Importing this package before ``ray`` keeps Ray on loopback (see :mod:`loraswap.serve.ray_local`).
"""

import os

from .folder import AdapterFolder
from .pool import AdapterPool

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Serve's high-throughput mode (Ray >= 2.55; set it to 0 to opt out): the ingress replicas answer HTTP
# themselves, replicas call each other over gRPC, request logs are buffered. Measured with `loraswap bench serve`
# (2026-11-28, hidden 128 x 2 layers, 2 replicas): loraswap 58 -> 74 requests/s, PEFT 30 -> 34. Ray reads it at
# import, in every process: the replicas inherit it from this one.
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")


def __getattr__(name: str):
    if name == "build_app":  # imports ray and fastapi: only when asked for
        from .app import build_app

        return build_app
    raise AttributeError(f"module 'loraswap.serve' has no attribute {name!r}")


__all__ = ["AdapterFolder", "AdapterPool", "build_app"]
