"""Timing helpers: modes timed in alternating rounds, medians, and paired differences with a confidence interval."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence


def alternating_samples(
    modes: Mapping[str, Callable[[], object]], rounds: int = 10, warmup: int = 2, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds of one call of each mode per round, ``rounds`` rounds.

    Alternating keeps a drift in machine speed (other tenants, thermal) from favouring one mode. Each
    round runs the modes in a fresh random order (seeded: the same orders every run), so that no mode
    always runs right after the same other one: what a mode leaves behind (caches emptied by a large
    read, allocator state) falls on every mode alike. A rotation would not do: it keeps the cyclic order,
    so each mode would nearly always follow the same neighbour.
    """
    for _ in range(warmup):
        for fn in modes.values():
            fn()
    order = random.Random(seed)
    names = list(modes)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            start = time.perf_counter()
            modes[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def alternating_medians(modes: Mapping[str, Callable[[], object]], rounds: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median seconds per mode over :func:`alternating_samples`."""
    return {name: statistics.median(values) for name, values in alternating_samples(modes, rounds, warmup).items()}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(median, low, high)`` of the per-round differences ``a[i] - b[i]``, with a distribution-free
    confidence interval for that median (order statistics of the differences; sign-test bounds).

    Pairing by round cancels what the machine did during that round, so two modes with the same cost
    give an interval around 0 even when the absolute times drift.
    """
    differences = sorted(x - y for x, y in zip(a, b, strict=True))
    n = len(differences)
    tail = (1 - confidence) / 2
    k = 0  # the largest k with P(Binomial(n, 1/2) < k) <= tail; the interval is the k-th smallest to k-th largest
    while k < n // 2 and sum(math.comb(n, i) for i in range(k + 1)) / 2**n <= tail:
        k += 1
    low, high = (differences[k - 1], differences[n - k]) if k else (differences[0], differences[-1])
    return statistics.median(differences), low, high
