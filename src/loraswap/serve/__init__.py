"""The Ray application: an OpenAI-compatible server on Ray Serve (``build_app``, ``loraswap serve``).

The pool and the adapter folder it serves from are core (:class:`loraswap.AdapterPool`,
:class:`loraswap.AdapterFolder`). Importing this package imports neither Ray nor FastAPI and sets no
environment variable: :mod:`loraswap.serve.app` configures Ray's environment (:func:`.ray_local.configure_ray_env`)
just before it imports Ray, and :func:`.ray_local.start_local_ray` checks it when a server starts.
"""


def __getattr__(name: str):
    if name == "build_app":  # imports ray and fastapi: only when asked for
        from .app import build_app

        return build_app
    raise AttributeError(f"module 'loraswap.serve' has no attribute {name!r}")


__all__ = ["build_app"]
