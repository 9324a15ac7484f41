"""The benchmarks' statistics: alternation in random orders and the paired-difference confidence interval."""

from __future__ import annotations

import random

from loraswap.bench.timing import alternating_samples, paired_difference


def test_alternating_samples_run_every_mode_once_a_round_after_varied_neighbours():
    calls = []
    modes = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    samples = alternating_samples(modes, rounds=40, warmup=0)
    rounds = [calls[i : i + 4] for i in range(0, len(calls), 4)]
    assert all(sorted(names) == list("abcd") for names in rounds)
    pairs = [(order[i - 1], order[i]) for order in rounds for i in range(1, 4)]
    predecessors = {name: {before for before, after in pairs if after == name} for name in "abcd"}
    assert predecessors == {name: set("abcd") - {name} for name in "abcd"}  # within a round: every other mode
    assert {name: len(values) for name, values in samples.items()} == {name: 40 for name in "abcd"}
    calls.clear()
    alternating_samples(modes, rounds=40, warmup=0)
    assert [calls[i : i + 4] for i in range(0, len(calls), 4)] == rounds  # seeded: the same orders every run


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
