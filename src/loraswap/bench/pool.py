"""``loraswap bench pool``: serving a catalogue of adapters through a few slots, against PEFT.

The swap benchmark's Llama (hidden 512, 8 layers) and a catalogue of PEFT adapters (ranks 4-64,
five target sets: :func:`~loraswap.testing.synthetic.write_catalogue`). Traffic is Zipf-distributed over the
catalogue (exponent about 1.1: a few adapters are hot, most are rare), in batches of rows x tokens.
Two traffic shapes, each served two ways in one run:

- mixed batches, one adapter id per row: loraswap's :class:`~loraswap.AdapterPool` (``slots``
  slots, a host cache holding ``cache_fraction`` of the catalogue) on the compiled model, against
  PEFT's eager model with an LRU of at most ``slots`` adapters loaded with ``load_adapter``
  (``delete_adapter`` evicts) and ``adapter_names=`` batches. PEFT's compiled model is not a
  contender here: it compiles a new graph for every new mix (``loraswap bench mixed`` measures that);
- one adapter per batch (swap on a miss): the same pool against PEFT's compiled model prepared
  with ``prepare_model_for_compiled_hotswap`` and ``hotswap_adapter`` on every change of adapter.

Reported per mode: rows/s, p50 and p99 batch latency (making the batch's adapters resident +
the forward), graphs compiled after warm-up, the pool's stats, and the largest logit difference
from PEFT's eager model on a few batches.
"""

from __future__ import annotations

import copy
import gc
import random
import statistics
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..attach import attach, find_targets
from ..capacity import Capacity
from ..compile_guard import CompileCounter
from ..layout import SlotLayout
from ..pool import AdapterPool
from ..testing.synthetic import tiny_llama, write_catalogue
from .report import format_seconds, print_table

POOL_MIXED = "loraswap pool, compiled: mixed batches"
PEFT_MIXED = "PEFT eager, LRU of load_adapter + adapter_names="
POOL_SINGLE = "loraswap pool, compiled: one adapter per batch"
PEFT_SINGLE = "PEFT compiled, hotswap_adapter on a change"
HIDDEN, LAYERS, VOCAB = 512, 8, 256


def zipf_ids(ids: Sequence[str], count: int, exponent: float, rng: random.Random) -> list[str]:
    """``count`` draws from ``ids``, the ``k``-th (from 1) with probability proportional to ``k ** -exponent``.

    The ranking is a shuffle of ``ids``, so hot adapters have every rank and target set."""
    ranked = list(ids)
    rng.shuffle(ranked)
    weights = [rank ** -exponent for rank in range(1, len(ranked) + 1)]
    return rng.choices(ranked, weights=weights, k=count)


def run_pool(
    adapters: int = 200,
    batches: int = 200,
    rows: int = 8,
    tokens: int = 32,
    slots: int = 8,
    zipf: float = 1.1,
    cache_fraction: float = 0.25,
    backend: str = "inductor",
    warmup: int = 8,
    threads: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Both traffic shapes, loraswap against PEFT, in one process; times in seconds."""
    if threads:
        torch.set_num_threads(threads)
    rng = random.Random(seed)
    base = tiny_llama(hidden=HIDDEN, layers=LAYERS, vocab=VOCAB, seed=seed)
    batch_tokens = torch.randint(0, VOCAB, (rows, tokens), generator=torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory() as directory:
        paths = write_catalogue(base, directory, adapters, seed=seed)
        ids = list(paths)
        mixed = [zipf_ids(ids, rows, zipf, rng) for _ in range(warmup + batches)]
        single = [[adapter_id] * rows for adapter_id in zipf_ids(ids, warmup + batches, zipf, rng)]
        start = time.perf_counter()
        capacity = Capacity.for_adapters(paths.values(), model=base, slots=slots, max_blend=1)
        plan_s = time.perf_counter() - start
        slot_bytes = _slot_bytes(base, capacity)
        cache_bytes = int(cache_fraction * adapters) * slot_bytes
        model = copy.deepcopy(base)
        pool_slots = attach(model, capacity, cache_bytes=cache_bytes)
        compiled = torch.compile(model, backend=backend)
        results = {}
        with torch.no_grad():
            pool = AdapterPool(pool_slots, resolve=paths.__getitem__)
            results[POOL_MIXED] = _serve(mixed, warmup, lambda batch: _pool_step(pool, compiled, batch, batch_tokens))
            results[POOL_MIXED]["pool_stats"] = pool.stats
            peft_lru = _PeftLru(base, paths, slots)
            results[PEFT_MIXED] = _serve(mixed, warmup, lambda batch: peft_lru.forward(batch, batch_tokens))
            pool = AdapterPool(pool_slots, resolve=paths.__getitem__)
            results[POOL_SINGLE] = _serve(single, warmup, lambda batch: _pool_step(pool, compiled, batch, batch_tokens))
            results[POOL_SINGLE]["pool_stats"] = pool.stats
            peft_swap = _PeftHotswap(base, paths, max(capacity.max_rank, 1), backend)
            results[PEFT_SINGLE] = _serve(single, warmup, lambda batch: peft_swap.forward(batch, batch_tokens))
            max_error = _max_error(pool, compiled, peft_lru, mixed[-3:], batch_tokens)
    for result in results.values():
        result["rows_per_s"] = rows / result["mean_s"]
    mixed_speedup = results[POOL_MIXED]["rows_per_s"] / results[PEFT_MIXED]["rows_per_s"]
    single_speedup = results[POOL_SINGLE]["rows_per_s"] / results[PEFT_SINGLE]["rows_per_s"]
    pool_modes = (POOL_MIXED, POOL_SINGLE)
    targets = [
        ("mixed: pool rows/s >= 3x PEFT eager", f"{mixed_speedup:.2f}x", mixed_speedup >= 3.0),
        *(
            (f"{mode}: 0 graphs compiled after warm-up", str(results[mode]["graphs_after_warmup"]),
             results[mode]["graphs_after_warmup"] == 0)
            for mode in pool_modes
        ),
        *(
            (f"{mode}: p99 <= 3x p50", f"{results[mode]['p99_s'] / results[mode]['p50_s']:.2f}x",
             results[mode]["p99_s"] <= 3 * results[mode]["p50_s"])
            for mode in pool_modes
        ),
    ]
    return {
        "model": f"Llama hidden={HIDDEN} layers={LAYERS} vocab={VOCAB}; batch {rows} rows x {tokens} tokens",
        "catalogue": f"{adapters} PEFT adapters, ranks 4-64, 5 target sets; Zipf exponent {zipf}",
        "slots": slots,
        "slot_bytes": slot_bytes,
        "host_cache": f"{int(cache_fraction * adapters)} adapters ({cache_bytes / 2**20:.0f} MiB)",
        "capacity_from_headers_s": plan_s,
        "batches": batches,
        "warmup_batches": warmup,
        "backend": backend,
        "torch_threads": torch.get_num_threads(),
        "modes": results,
        "speedup_mixed": mixed_speedup,
        "speedup_single": single_speedup,
        "max_abs_logit_error_vs_peft": max_error,
        "targets": [{"target": text, "measured": value, "met": met} for text, value, met in targets],
    }


def _slot_bytes(base: torch.nn.Module, capacity: Capacity) -> int:
    targets = find_targets(base, capacity)
    return SlotLayout.plan(((name, module, cls.spec(module)) for name, module, cls in targets), capacity).slot_nbytes


def _pool_step(pool: AdapterPool, compiled, batch: list[str], tokens: torch.Tensor) -> torch.Tensor:
    with pool.route(batch):
        return compiled(tokens).logits


def _serve(traffic: list[list[str]], warmup: int, step: Callable[[list[str]], object]) -> dict[str, Any]:
    """Run ``warmup`` batches, then time every other batch; count the graphs compiled after warm-up."""
    for batch in traffic[:warmup]:
        step(batch)
    seconds = []
    gc.collect()
    with CompileCounter() as graphs:
        for batch in traffic[warmup:]:
            start = time.perf_counter()
            step(batch)
            seconds.append(time.perf_counter() - start)
    ordered = sorted(seconds)
    return {
        "batches": len(seconds),
        "mean_s": statistics.fmean(seconds),
        "p50_s": statistics.median(seconds),
        "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "graphs_after_warmup": graphs.graphs,
    }


class _PeftLru:
    """PEFT's eager model with at most ``capacity`` adapters loaded: ``load_adapter`` on a miss, ``delete_adapter``
    of the least recently used one that the batch does not need."""

    def __init__(self, base: torch.nn.Module, paths: dict[str, Path], capacity: int) -> None:
        from peft import PeftModel

        self.paths = paths
        self.capacity = capacity
        first = next(iter(paths))
        self.model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[first]), adapter_name=first).eval()
        self.loaded: OrderedDict[str, None] = OrderedDict({first: None})

    def forward(self, batch: list[str], tokens: torch.Tensor) -> torch.Tensor:
        needed = set(batch)
        for adapter_id in dict.fromkeys(batch):
            if adapter_id in self.loaded:
                self.loaded.move_to_end(adapter_id)
                continue
            if len(self.loaded) >= self.capacity:
                victim = next(name for name in self.loaded if name not in needed)
                self.model.delete_adapter(victim)
                del self.loaded[victim]
            self.model.load_adapter(str(self.paths[adapter_id]), adapter_name=adapter_id)
            self.loaded[adapter_id] = None
        return self.model(tokens, adapter_names=batch).logits


class _PeftHotswap:
    """PEFT's compiled model, prepared for hotswapping; ``hotswap_adapter`` whenever the batch's adapter changes.

    It starts from the catalogue's first adapter, which targets every projection: PEFT can then swap in
    adapters on any subset of them (a later adapter on a layer the first one lacks cannot be swapped)."""

    def __init__(self, base: torch.nn.Module, paths: dict[str, Path], max_rank: int, backend: str) -> None:
        from peft import PeftModel
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        self.paths = paths
        self.current = next(iter(paths))
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[self.current])).eval()
        prepare_model_for_compiled_hotswap(model, target_rank=max_rank)
        self.model = model
        self.compiled = torch.compile(model, backend=backend)

    def forward(self, batch: list[str], tokens: torch.Tensor) -> torch.Tensor:
        from peft.utils.hotswap import hotswap_adapter

        if batch[0] != self.current:
            hotswap_adapter(self.model, str(self.paths[batch[0]]), adapter_name="default", torch_device="cpu")
            self.current = batch[0]
        return self.compiled(tokens).logits


def _max_error(pool: AdapterPool, compiled, peft_lru: _PeftLru, batches: list[list[str]], tokens) -> float:
    """Largest logit difference between the pool's compiled model and PEFT's eager model on the same batches."""
    return max(
        (_pool_step(pool, compiled, batch, tokens) - peft_lru.forward(batch, tokens)).abs().max().item()
        for batch in batches
    )


def print_pool(result: dict[str, Any]) -> None:
    title = (
        f"loraswap bench pool: {result['model']}; {result['catalogue']}; {result['slots']} slots of "
        f"{result['slot_bytes'] / 2**20:.1f} MiB; host cache {result['host_cache']}; {result['batches']} batches "
        f"after {result['warmup_batches']} warm-up; backend {result['backend']}; {result['torch_threads']} torch thread(s)"
    )
    rows = [
        (
            mode,
            f"{r['rows_per_s']:.1f}",
            format_seconds(r["p50_s"]),
            format_seconds(r["p99_s"]),
            str(r["graphs_after_warmup"]),
            _stats(r.get("pool_stats")),
        )
        for mode, r in result["modes"].items()
    ]
    print_table(title, ["mode", "rows/s", "p50", "p99", "graphs after warm-up", "pool stats"], rows)
    print_table(
        "targets (same run)",
        ["target", "measured", "met"],
        [(t["target"], t["measured"], "yes" if t["met"] else "NO") for t in result["targets"]],
    )
    print(
        f"one adapter per batch: pool {result['speedup_single']:.2f}x PEFT compiled hotswap's rows/s; "
        f"Capacity.for_adapters over the catalogue (headers only): {format_seconds(result['capacity_from_headers_s'])}; "
        f"max abs logit error vs PEFT eager: {result['max_abs_logit_error_vs_peft']:.2e}"
    )


def _stats(stats: dict[str, int] | None) -> str:
    if stats is None:
        return "-"
    short = {"slot_hits": "hit", "slot_loads": "load", "evictions": "evict", "host_hits": "host hit", "host_misses": "miss"}
    return ", ".join(f"{short[key]} {value}" for key, value in stats.items())

