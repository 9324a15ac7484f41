"""The benchmarks' statistics: rotating alternation and the paired-difference confidence interval."""

from __future__ import annotations

import random

from loraswap.bench.timing import alternating_samples, paired_difference


def test_alternating_samples_rotate_the_order_every_round():
    calls = []
    modes = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = alternating_samples(modes, rounds=3, warmup=0)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(values) for name, values in samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_paired_difference_interval_covers_the_true_median_at_its_level():
    rng = random.Random(0)
    trials, covered = 400, 0
    for _ in range(trials):
        a = [rng.gauss(0.3, 1.0) for _ in range(40)]
        b = [rng.gauss(0.0, 0.1) for _ in range(40)]
        _, low, high = paired_difference(a, b)
        covered += low <= 0.3 <= high
    assert 0.92 <= covered / trials <= 0.99


def test_paired_difference_separates_a_consistent_gap_from_a_tie():
    drift = [0.1 * (i % 7) for i in range(60)]  # the machine's speed changes round to round, for both modes alike
    slower = [d + 1.0 + 0.01 * (i % 3) for i, d in enumerate(drift)]
    median, low, _ = paired_difference(slower, drift)
    assert low > 0.99 and median > 0.99
    tie = [d + (0.01 if i % 2 else -0.01) for i, d in enumerate(drift)]
    median, low, high = paired_difference(tie, drift)
    assert low < 0 < high
