"""Proof that a swap did not recompile: :func:`no_recompile` and :class:`CompileCounter`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .errors import RecompileError


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters  # dynamo is heavy to import: only when counting

    return counters["stats"]["unique_graphs"]


@contextmanager
def no_recompile() -> Iterator[None]:
    """Raise :class:`RecompileError` if dynamo recompiles any frame inside the block.

    The first compilation of a frame is allowed; a second graph for a frame it already compiled
    (a guard failed: a new shape, a new Python value) is not.
    """
    import torch._dynamo

    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            yield
    except torch._dynamo.exc.RecompileError as err:
        raise RecompileError(f"torch.compile recompiled inside loraswap.no_recompile(): {err}") from err


class CompileCounter:
    """Counts the graphs dynamo compiles (first compilations and recompilations) while it is open."""

    def __enter__(self) -> CompileCounter:
        self._start = _graphs_compiled()
        return self

    def __exit__(self, *exc) -> None:
        self._end = _graphs_compiled()

    @property
    def graphs(self) -> int:
        return getattr(self, "_end", _graphs_compiled()) - self._start
