"""Timing helpers: medians of repeated calls, modes timed in alternating rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def median_seconds(fn: Callable[[], object], repeat: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeat`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def alternating_medians(modes: Mapping[str, Callable[[], object]], rounds: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median seconds per mode, timing one call of each mode per round, in turn.

    Alternating keeps a drift in machine speed (other tenants, thermal) from favouring one mode.
    """
    for _ in range(warmup):
        for fn in modes.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(rounds):
        for name, fn in modes.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
