"""Proof that a swap did not recompile: :func:`no_recompile` and :class:`CompileCounter`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .errors import RecompileError

_REPLACED_LAYER_TYPES: set[str] = set()  # class names of the layers attach wrapped in slot layers, in this process


def note_replaced_layer_types(types: Iterable[type]) -> None:
    """Record the classes of the layers ``attach`` replaced, so a recompile they cause can be named."""
    _REPLACED_LAYER_TYPES.update(t.__name__ for t in types)


def _attach_after_first_call(message: str) -> bool:
    """Whether dynamo's guard failure is a module type check on a class ``attach`` replaced with a slot layer."""
    hinted = set(re.findall(r"___check_type_id\(.*?HINT: type (\w+)\)", message))
    return bool(hinted & _REPLACED_LAYER_TYPES)


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
        cause = ""
        if _attach_after_first_call(str(err)):
            cause = (
                "loraswap.attach replaced layers of a model that had already run compiled: attach must precede the "
                "first compiled call (attach, then torch.compile, then run the model). "
            )
        raise RecompileError(f"torch.compile recompiled inside loraswap.no_recompile(): {cause}{err}") from err


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
