"""Proof that a swap did not recompile: :func:`no_recompile` and :class:`CompileCounter`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch._dynamo
from torch._dynamo.utils import counters

from .errors import RecompileError


@contextmanager
def no_recompile() -> Iterator[None]:
    """Raise :class:`RecompileError` if dynamo recompiles any frame inside the block.

    The first compilation of a frame is allowed; a second graph for a frame it already compiled
    (a guard failed: a new shape, a new Python value) is not.
    """
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            yield
    except torch._dynamo.exc.RecompileError as err:
        raise RecompileError(f"torch.compile recompiled inside loraswap.no_recompile(): {err}") from err


class CompileCounter:
    """Counts the graphs dynamo compiles (first compilations and recompilations) while it is open."""

    def __enter__(self) -> CompileCounter:
        self._start = counters["stats"]["unique_graphs"]
        return self

    def __exit__(self, *exc) -> None:
        self._end = counters["stats"]["unique_graphs"]

    @property
    def graphs(self) -> int:
        return getattr(self, "_end", counters["stats"]["unique_graphs"]) - self._start
