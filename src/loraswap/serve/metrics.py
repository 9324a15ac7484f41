"""Prometheus metrics: each replica counts in its own registry; the ingress renders every replica's, labelled.

Replicas are separate processes, so a replica sends its registry's samples (plain tuples) to the stats board
with its other figures, and ``/metrics`` rebuilds them as metric families with a ``replica`` label
(prometheus-client's text format). Figures may lag a request, as ``/v1/stats`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]  # name, help, type, samples


class EngineMetrics:
    """One replica's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("loraswap_requests", "Requests finished, by finish reason.", ["finish_reason"], registry=registry)
        self.prompt_tokens = Counter("loraswap_prompt_tokens", "Prompt tokens prefilled.", registry=registry)
        self.generation_tokens = Counter("loraswap_generation_tokens", "Tokens generated.", registry=registry)
        self.ttft = Histogram(
            "loraswap_time_to_first_token_seconds", "From a request's arrival in the engine to its first token.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.itl = Histogram(
            "loraswap_inter_token_latency_seconds", "Between consecutive tokens of one request.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.adapter_loads = Counter("loraswap_adapter_loads", "Adapters loaded into a slot.", registry=registry)
        self.recompiles = Counter("loraswap_recompiles", "Graphs compiled after warm-up (0 is the goal).", registry=registry)
        self.running = Gauge("loraswap_running_requests", "Requests holding a row of the batch.", registry=registry)
        self._synced = {"adapter_loads": 0, "recompiles": 0}

    def finished(self, sequence) -> None:
        """Count a finished request (an engine ``Generation``)."""
        self.requests.labels(finish_reason=sequence.finish_reason).inc()
        self.prompt_tokens.inc(sequence.prompt_tokens)
        self.generation_tokens.inc(len(sequence.tokens))
        if sequence.first_token_at is not None:
            self.ttft.observe(sequence.first_token_at - sequence.arrived)
        for before, after in zip(sequence.token_times, sequence.token_times[1:]):
            self.itl.observe(after - before)

    def request(self, finish_reason: str = "stop") -> None:
        """Count a request without tokens (an image request)."""
        self.requests.labels(finish_reason=finish_reason).inc()

    def sync(self, adapter_loads: int, recompiles: int, running: int) -> None:
        """Bring the counters kept elsewhere (the pool's loads, the compile counter) up to their totals."""
        for name, total in (("adapter_loads", adapter_loads), ("recompiles", recompiles)):
            getattr(self, name).inc(max(0, total - self._synced[name]))
            self._synced[name] = max(total, self._synced[name])
        self.running.set(running)

    def families(self) -> list[Family]:
        """The registry's samples as plain tuples (picklable: they travel to the stats board)."""
        return [
            (family.name, family.documentation, family.type, [(s.name, dict(s.labels), s.value) for s in family.samples])
            for family in self.registry.collect()
        ]


def render(replicas: Mapping[str, Iterable[Family]]) -> bytes:
    """Prometheus text for every replica's families, each sample labelled with its replica."""
    merged: dict[str, Metric] = {}
    for replica, families in sorted(replicas.items()):
        for name, documentation, kind, samples in families:
            family = merged.setdefault(name, Metric(name, documentation, kind))
            for sample_name, labels, value in samples:
                family.add_sample(sample_name, {**labels, "replica": replica}, value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(merged.values())))
    return generate_latest(registry)


class _Fixed:
    """A collector that hands out metric families built elsewhere."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
