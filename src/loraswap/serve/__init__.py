"""Serving many adapters: the adapter pool and an OpenAI-compatible server on Ray Serve.

Importing this package before ``ray`` keeps Ray on loopback (see :mod:`loraswap.serve.ray_local`).
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def __getattr__(name: str):
    if name == "build_app":  # imports ray and fastapi: only when asked for
        from .app import build_app

        return build_app
    raise AttributeError(f"module 'loraswap.serve' has no attribute {name!r}")
