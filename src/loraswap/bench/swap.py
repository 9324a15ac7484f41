"""``loraswap bench swap``: what one adapter swap costs, against PEFT's hotswap and a plain memory copy.

One Llama-style model (hidden 512, 8 layers, LoRA on all seven projections) and PEFT adapters of
ranks 8/16/32/64 written by PEFT itself. Each mode cycles through the adapters; the modes are
timed in alternating rounds in one process:

- PEFT: ``prepare_model_for_compiled_hotswap(target_rank=64)`` once, then ``hotswap_adapter`` per swap;
- loraswap cold load: ``load`` with the host cache disabled (read from the file's memory map,
  validate, copy straight into the slot every time);
- loraswap warm swap: ``load`` of an adapter already in the host cache;
- loraswap activate: switch every row to the other, pre-loaded slot (timed as 100 activations per
  sample, reported per activation);
- padded floor: one ``copy_`` of a whole padded slot row from host memory (what a swap that copies every
  padded byte cannot beat);
- live floor: one ``copy_`` of as many bytes as the adapter's live rank rows hold (its rank, not the
  capacity's: the bytes a swap of that adapter must move, see :mod:`loraswap.layout`). The
  ``<= 1.3x the copy floor`` target uses this floor.

Each floor copies into a destination of its own, as each swap mode writes a slot of its own. (Until
2026-11-28 the two floors shared one, written twice as often as any slot row. The live floor of a
rank-64 adapter then measured 0.9-1.0 ms in some runs, while a probe timed the warm swap's copy of
the same bytes into its slot, in the same mix of modes, at 1.15 ms; with its own destination the
floor measures 1.25 ms.)

Each swap mode cycles through the four adapters, and a swap of rank 64 costs about eight times one of
rank 8, so the samples of one mode form four clusters. The figure per mode is the mean over the four
adapters of each adapter's median: the cost of one swap averaged over the cycle, a statistic that is
stable where the median of all the samples is not (it lands anywhere in the gap between the second
and third cluster). Each adapter's medians are reported too.

Swap cost does not depend on compilation, so neither model is compiled here (``loraswap demo``
and the tests show that swaps do not recompile). The garbage collector is paused while timing,
as ``timeit`` does: torch, transformers and PEFT keep about a million objects alive, so one
collection pass (about 3 ms here) that lands inside a 1 ms swap would time the collector, not
the swap, and where it lands depends on the other modes' allocations.
"""

from __future__ import annotations

import copy
import gc
import itertools
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..attach import attach
from ..capacity import Capacity
from ..testing.synthetic import LLAMA_PROJECTIONS, tiny_llama, write_adapters
from .report import format_seconds, plot_bars, print_table
from .timing import alternating_samples

BENCH_RANKS = (8, 16, 32, 64)
PEFT = "PEFT hotswap_adapter"
COLD = "loraswap cold load"
WARM = "loraswap warm swap"
ACTIVATE = "loraswap activate"
FLOOR = "padded floor: one copy_"
LIVE_FLOOR = "live floor: one copy_"

WARMUP = 2
ACTIVATIONS_PER_SAMPLE = 100  # one activate (~5 us) is below what one perf_counter sample after a 16 MiB copy resolves

TARGETS = (
    ("warm swap >= 20x faster than PEFT hotswap_adapter", "peft_over_warm", ">=", 20.0),
    ("warm swap <= 1.3x the live-bytes copy floor", "warm_over_live_floor", "<=", 1.3),
    ("cold load (host cache off) <= 0.5x PEFT hotswap_adapter", "cold_over_peft", "<=", 0.5),
    ("activate < 20 us", "activate_us", "<", 20.0),
)


def run_swap(
    rounds: int = 100,
    hidden: int = 512,
    layers: int = 8,
    ranks: Sequence[int] = BENCH_RANKS,
    seed: int = 0,
    threads: int = 0,
) -> dict[str, Any]:
    """Time the five modes side by side; medians in seconds, ratios, targets met.

    ``threads``: ``torch.set_num_threads`` for the run (0 keeps torch's default).
    """
    if threads:
        torch.set_num_threads(threads)
    base = tiny_llama(hidden=hidden, layers=layers, vocab=256, seed=seed)
    specs = {f"rank-{r}": {"r": r, "lora_alpha": 2 * r, "target_modules": list(LLAMA_PROJECTIONS)} for r in ranks}
    with tempfile.TemporaryDirectory() as directory:
        paths = [str(path) for path in write_adapters(base, Path(directory), specs).values()]
        modes, check, padded_bytes, live_bytes = _modes(base, paths, max(ranks))
        gc.collect()
        gc.disable()
        try:
            samples = alternating_samples({name: mode.run for name, mode in modes.items()}, rounds, WARMUP)
        finally:
            gc.enable()
        per_adapter = {name: mode.medians(samples[name]) for name, mode in modes.items()}
        medians = {name: statistics.fmean(by_adapter.values()) for name, by_adapter in per_adapter.items()}
        medians[ACTIVATE] /= ACTIVATIONS_PER_SAMPLE
        max_abs_error = check()
    ratios = {
        "peft_over_warm": medians[PEFT] / medians[WARM],
        "warm_over_floor": medians[WARM] / medians[FLOOR],
        "warm_over_live_floor": medians[WARM] / medians[LIVE_FLOOR],
        "cold_over_peft": medians[COLD] / medians[PEFT],
        "activate_us": medians[ACTIVATE] * 1e6,
    }
    return {
        "model": f"Llama hidden={hidden} layers={layers}, LoRA on {', '.join(LLAMA_PROJECTIONS)}",
        "adapters": list(specs),
        "padded_bytes": padded_bytes,
        "live_bytes": live_bytes,  # per adapter, in the order of "adapters"
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "gc_paused_while_timing": True,
        "medians_s": medians,  # per mode: the mean over the adapters of each adapter's median
        "per_adapter_medians_s": {name: by_adapter for name, by_adapter in per_adapter.items() if name != ACTIVATE},
        "ratios": ratios,
        "targets": [
            {"target": text, "measure": key, "value": ratios[key], "met": _compare(ratios[key], op, bound)}
            for text, key, op, bound in TARGETS
        ],
        "max_abs_error_vs_peft": max_abs_error,
    }


def _modes(base: torch.nn.Module, paths: list[str], max_rank: int):
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0]).eval()
    prepare_model_for_compiled_hotswap(peft_model, target_rank=max_rank)

    warm_model, cold_model = copy.deepcopy(base), copy.deepcopy(base)
    capacity = Capacity.for_adapters(paths, model=base, slots=2)
    warm = attach(warm_model, capacity)
    cold = attach(cold_model, capacity, cache_bytes=0)
    packed = [warm.packed(path) for path in paths]
    if len(packed[0].weights) != 1:
        raise RuntimeError("the swap benchmark expects one dtype group (one flat buffer per slot)")
    floor_destination, live_destination = (torch.empty_like(packed[0].weights[0]) for _ in range(2))
    live = [(live_destination[: entry.live_numel[0]], entry.weights[0][: entry.live_numel[0]]) for entry in packed]

    names = [Path(path).name for path in paths]
    shifted = names[2:] + names[:2]  # the floors cycle from another adapter than the swaps
    modes = {
        PEFT: Cycling(
            lambda path: hotswap_adapter(peft_model, path, adapter_name="default", torch_device="cpu"), names, paths
        ),
        COLD: Cycling(cold.load, names, paths),
        WARM: Cycling(warm.load, names, paths),
        ACTIVATE: Cycling(
            lambda _: [warm.activate(slot) for slot in (1, 0) * (ACTIVATIONS_PER_SAMPLE // 2)], ["all"], [None]
        ),
        FLOOR: Cycling(lambda entry: floor_destination.copy_(entry.weights[0]), shifted, packed[2:] + packed[:2]),
        LIVE_FLOOR: Cycling(lambda pair: pair[0].copy_(pair[1]), shifted, live[2:] + live[:2]),
    }

    def check() -> float:
        """Max abs logit difference between loraswap (warm load) and PEFT, both on the last adapter."""
        tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        hotswap_adapter(peft_model, paths[-1], adapter_name="default", torch_device="cpu")
        warm.load(paths[-1], slot=0)
        warm.activate(0)
        with torch.no_grad():
            return (warm_model(tokens).logits - peft_model(tokens).logits).abs().max().item()

    item = packed[0].weights[0].element_size()
    return modes, check, packed[0].nbytes, [entry.live_numel[0] * item for entry in packed]


class Cycling:
    """A mode that applies ``action`` to ``items`` in turn, remembering which item (by ``label``) each call used."""

    def __init__(self, action: Callable[[Any], object], labels: Sequence[str], items: Sequence[Any]) -> None:
        self._order = itertools.cycle(zip(labels, items))
        self._action = action
        self.used: list[str] = []

    def run(self) -> None:
        label, item = next(self._order)
        self.used.append(label)
        self._action(item)

    def medians(self, samples: Sequence[float]) -> dict[str, float]:
        """Each item's median over ``samples``, the timed calls (the last ones: warm-up calls come first)."""
        by_label: dict[str, list[float]] = {}
        for label, seconds in zip(self.used[-len(samples) :], samples, strict=True):
            by_label.setdefault(label, []).append(seconds)
        return {label: statistics.median(values) for label, values in by_label.items()}


def _compare(value: float, op: str, bound: float) -> bool:
    return {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]


def print_swap(result: dict[str, Any]) -> None:
    medians = result["medians_s"]
    rows = [
        (
            mode,
            format_seconds(seconds),
            f"{seconds / medians[FLOOR]:.2f}x",
            f"{seconds / medians[LIVE_FLOOR]:.2f}x",
            f"{medians[PEFT] / seconds:.1f}x" if mode != PEFT else "1.0x",
        )
        for mode, seconds in medians.items()
    ]
    title = (
        f"loraswap bench swap: {result['model']}; adapters {', '.join(result['adapters'])}; "
        f"{result['padded_bytes'] / 2**20:.1f} MiB padded, "
        f"{'/'.join(f'{size / 2**20:.1f}' for size in result['live_bytes'])} MiB live; "
        f"one swap: each adapter's median over {result['rounds']} rounds (modes in random order), averaged over "
        f"the adapters; {result['torch_threads']} torch thread(s)"
    )
    wide = Console(width=max(Console().width, 100))  # five columns: keep the mode names on one line
    print_table(title, ["mode", "per swap", "vs padded floor", "vs live floor", "speed-up vs PEFT"], rows, wide)
    per_adapter = result["per_adapter_medians_s"]
    print_table(
        "each adapter's median (the swap into it from the one before in the cycle)",
        ["mode", *result["adapters"]],
        [(mode, *(format_seconds(times[name]) for name in result["adapters"])) for mode, times in per_adapter.items()],
        wide,
    )
    print_table(
        "targets (same run)",
        ["target", "measured", "met"],
        [(t["target"], _measured(t["measure"], t["value"]), "yes" if t["met"] else "NO") for t in result["targets"]],
    )
    print(f"max abs logit error vs PEFT after a warm swap: {result['max_abs_error_vs_peft']:.2e}")


def _measured(measure: str, value: float) -> str:
    return f"{value:.1f} us" if measure.endswith("_us") else f"{value:.2f}x"


def plot_swap(result: dict[str, Any], path: Path) -> None:
    medians = result["medians_s"]
    plot_bars(
        path,
        "One adapter swap (median)",
        {mode: seconds * 1e3 for mode, seconds in medians.items() if mode not in (FLOOR, LIVE_FLOOR)},
        unit="ms",
        reference=medians[LIVE_FLOOR] * 1e3,
        reference_label="live-bytes copy floor",
    )
