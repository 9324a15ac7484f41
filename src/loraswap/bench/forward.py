"""``loraswap bench forward``: what an unmerged adapter costs per forward, and what the modes cost per swap.

A Llama-style model (hidden 512, 8 layers, LoRA on all seven projections), one compiled copy per
mode, timed in alternating rounds on the same tokens: the base model, loraswap slots with one
padded rank everywhere (uniform), slots sized per layer (``per_layer_rank=True``), fused mode
(the adapter merged into the base weights) and PEFT's ``prepare_model_for_compiled_hotswap``-
prepared model. Two adapter sets:

- (a) four adapters of ranks 8, 16, 32 and 64 on every projection;
- (b) one adapter of rank 128 on ``q_proj`` (rank 8 elsewhere) and three of ranks 4-8: the uniform
  capacity pads every layer to 128, the per-layer one only ``q_proj``.

Overhead is a mode's median forward minus the base model's. Whether slots cost more than PEFT is
judged on the per-round differences (slots minus PEFT, timed back to back in each round): their
median and 95% confidence interval; the target counts as met unless the whole interval lies above
zero (slots measurably slower). Uniform capacity computes exactly PEFT's padded matmuls, so there
the two are expected to tie and the interval to straddle zero. Swap times cycle through the set:
loraswap ``load`` from its host cache, fused ``load`` (a merge), PEFT's ``hotswap_adapter``. After
each swap every mode's output is compared with PEFT's eager model, and recompilations are counted.
Timings use one torch thread by default (``--threads``): steadier on a shared CPU.

Set (d), the DoRA rows (:mod:`loraswap.bench.dora`): set (a)'s rank-8 adapter as plain LoRA and as DoRA in
one capacity with DoRA room: one slot active, a routed batch with half the rows on DoRA, a swap from the cache.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from ..attach import attach
from ..capacity import Capacity
from ..compile_guard import CompileCounter
from ..testing.synthetic import LLAMA_PROJECTIONS, peft_reference, tiny_llama, write_adapters
from .dora import dora_rows, dora_targets
from .report import format_seconds, plot_bars, print_table
from .timing import alternating_samples, paired_difference

VOCAB = 1024
ADAPTER_SETS: dict[str, dict[str, dict[str, Any]]] = {
    "a": {
        f"r{rank}": dict(r=rank, lora_alpha=2 * rank, target_modules=list(LLAMA_PROJECTIONS))
        for rank in (8, 16, 32, 64)
    },
    "b": {
        "q-r128": dict(r=8, lora_alpha=16, target_modules=list(LLAMA_PROJECTIONS), rank_pattern={"q_proj": 128}),
        "r4": dict(r=4, lora_alpha=8, target_modules=list(LLAMA_PROJECTIONS)),
        "r6": dict(r=6, lora_alpha=6, target_modules=list(LLAMA_PROJECTIONS)),
        "r8": dict(r=8, lora_alpha=16, target_modules=list(LLAMA_PROJECTIONS)),
    },
}
SET_TITLES = {
    "a": "set (a): four adapters, ranks 8/16/32/64 on all seven projections",
    "b": "set (b): one adapter rank 128 on q_proj (8 elsewhere), three of ranks 4-8",
}
BASE, UNIFORM, PER_LAYER, FUSED, PEFT = "base", "slots uniform", "slots per-layer", "fused", "PEFT hotswap"
MODE_NOTES = {
    BASE: "compiled base model, no LoRA",
    UNIFORM: "loraswap slots, Capacity.for_adapters (one padded rank)",
    PER_LAYER: "loraswap slots, Capacity.for_adapters(per_layer_rank=True)",
    FUSED: "loraswap attach(mode='fused'): adapter merged into the base weights",
    PEFT: "PEFT prepare_model_for_compiled_hotswap + hotswap_adapter",
}


class Mode:
    """One compiled model and the verb that swaps an adapter into it."""

    def __init__(self, model: nn.Module, swap: Callable[[Path], None] | None, padded_ranks: str) -> None:
        self.model = model
        self.compiled = torch.compile(model)
        self.swap = swap
        self.padded_ranks = padded_ranks


def _peft_prepared(base: nn.Module, paths: Mapping[str, Path], target_rank: int) -> Mode:
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    first = next(iter(paths.values()))
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(first)).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=target_rank)
    return Mode(model, lambda path: hotswap_adapter(model, str(path), adapter_name="default"), "")


def _ranks_summary(capacity: Capacity) -> str:
    """``'56 x r64'`` or, per layer, ``'48 x r8 + 8 x r128'``."""
    ranks = [capacity.rank_for(name) for name in capacity.target_modules]
    return " + ".join(f"{ranks.count(rank)} x r{rank}" for rank in sorted(set(ranks)))


def build_modes(base: nn.Module, paths: Mapping[str, Path]) -> dict[str, Mode]:
    """One model per mode, each with the set's first adapter loaded."""
    first = next(iter(paths.values()))
    modes = {BASE: Mode(copy.deepcopy(base), None, "-")}
    for name, per_layer in ((UNIFORM, False), (PER_LAYER, True)):
        model = copy.deepcopy(base)
        capacity = Capacity.for_adapters(paths.values(), model=model, per_layer_rank=per_layer)
        slots = attach(model, capacity)
        slots.load(first)
        modes[name] = Mode(model, slots.load, _ranks_summary(capacity))
    model = copy.deepcopy(base)
    fused = attach(model, Capacity.for_adapters(paths.values(), model=model), mode="fused")
    fused.load(first)
    modes[FUSED] = Mode(model, fused.load, f"merged (pristine copy {fused.pristine_nbytes / 2**20:.0f} MiB)")
    capacity = Capacity.for_adapters(paths.values())
    modes[PEFT] = _peft_prepared(base, paths, capacity.max_rank)
    modes[PEFT].padded_ranks = _ranks_summary(capacity)
    return modes


def _logits(mode: Mode, tokens: torch.Tensor) -> torch.Tensor:
    return mode.compiled(tokens).logits


def measure_swaps(
    modes: Mapping[str, Mode], references: Mapping[Path, torch.Tensor], tokens: torch.Tensor, cycles: int
) -> dict:
    """Median swap time per mode over ``cycles`` passes through the set; after each swap of the first pass,
    every mode's output against PEFT's eager model with that adapter; graphs compiled meanwhile."""
    swapping = {name: mode for name, mode in modes.items() if mode.swap is not None}
    seconds: dict[str, list[float]] = {name: [] for name in swapping}
    max_error = dict.fromkeys(swapping, 0.0)
    order = list(references)
    with CompileCounter() as counter:
        for cycle in range(cycles):
            for path in order[1:] + order[:1]:
                for name, mode in swapping.items():
                    start = time.perf_counter()
                    mode.swap(path)
                    seconds[name].append(time.perf_counter() - start)
                if cycle == 0:
                    for name, mode in swapping.items():
                        error = (_logits(mode, tokens) - references[path]).abs().max().item()
                        max_error[name] = max(max_error[name], error)
    return {
        "swap_median_s": {name: statistics.median(values) for name, values in seconds.items()},
        "max_abs_error_vs_peft_eager": max_error,
        "graphs_compiled_during_swaps": counter.graphs,
    }


def run_set(set_name: str, rounds: int, batch: int, seq: int, swap_cycles: int, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    base = tiny_llama(hidden=512, layers=8, vocab=VOCAB, seed=seed)
    tokens = torch.randint(0, VOCAB, (batch, seq))
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations inside PEFT
        warnings.simplefilter("ignore", UserWarning)
        paths = write_adapters(base, Path(directory), ADAPTER_SETS[set_name])
        references = {path: peft_reference(base, path)(tokens).logits for path in paths.values()}
        modes = build_modes(base, paths)
        for mode in modes.values():
            mode.compiled(tokens)  # compile outside the timed rounds
        samples = alternating_samples(
            {name: (lambda m=mode: m.compiled(tokens)) for name, mode in modes.items()}, rounds=rounds, warmup=3
        )
        swaps = measure_swaps(modes, references, tokens, swap_cycles)
    forward = {name: statistics.median(values) for name, values in samples.items()}
    base_s = forward[BASE]
    overhead = {name: seconds - base_s for name, seconds in forward.items() if name != BASE}
    return {
        "title": SET_TITLES[set_name],
        "adapters": {
            name: spec["r"] if "rank_pattern" not in spec else f"{spec['r']}, q_proj 128"
            for name, spec in ADAPTER_SETS[set_name].items()
        },
        "padded_ranks": {name: mode.padded_ranks for name, mode in modes.items()},
        "forward_median_s": forward,
        "vs_base": {name: seconds / base_s for name, seconds in forward.items()},
        "overhead_s": overhead,
        "minus_peft_per_round_s": {
            name: dict(zip(("median", "ci95_low", "ci95_high"), paired_difference(samples[name], samples[PEFT])))
            for name in (UNIFORM, PER_LAYER)
        },
        **swaps,
    }


def run_dora_set(rounds: int, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """Set (d): DoRA vs plain LoRA of set (a)'s rank 8, on the same model."""
    torch.manual_seed(seed)
    base = tiny_llama(hidden=512, layers=8, vocab=VOCAB, seed=seed)
    tokens = torch.randint(0, VOCAB, (batch, seq))
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        result = dora_rows(base, ADAPTER_SETS["a"]["r8"], Path(directory), tokens, rounds)
    return {"title": "set (d): DoRA vs plain LoRA, rank 8 on all seven projections, one capacity with DoRA room",
            "dora": True, **result}  # fmt: skip


def check_targets(sets: Mapping[str, dict]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure and whether it is met."""
    targets = []
    for set_name, result in sets.items():
        if result.get("dora"):
            targets += dora_targets(result)
            continue
        overhead = result["overhead_s"]
        for mode in (UNIFORM, PER_LAYER):
            difference = result["minus_peft_per_round_s"][mode]
            targets.append(
                {
                    "target": f"({set_name}) {mode} overhead <= PEFT's",
                    "measured": f"{format_seconds(overhead[mode])} vs {format_seconds(overhead[PEFT])}; per round "
                    f"{format_seconds(difference['median'])} [{format_seconds(difference['ci95_low'])}, "
                    f"{format_seconds(difference['ci95_high'])}]",
                    "met": difference["ci95_low"] <= 0,
                }
            )
        targets.append(
            {
                "target": f"({set_name}) fused within 3% of base",
                "measured": f"{(result['vs_base'][FUSED] - 1) * 100:+.1f}%",
                "met": result["vs_base"][FUSED] <= 1.03,
            }
        )
    if "b" in sets:
        overhead = sets["b"]["overhead_s"]
        cut = overhead[UNIFORM] / overhead[PER_LAYER] if overhead[PER_LAYER] > 0 else float("inf")
        targets.append(
            {
                "target": "(b) per-layer rank cuts the slots overhead >= 2x",
                "measured": f"{cut:.1f}x",
                "met": cut >= 2.0,
            }
        )
    return targets


def run_forward(
    sets: str = "abd", rounds: int = 60, batch: int = 1, seq: int = 128, swap_cycles: int = 3, threads: int | None = 1
) -> dict[str, Any]:
    """Run the benchmark on the named adapter sets; medians in seconds.

    ``threads=1`` by default: on a shared CPU, a parallel region waits for its slowest thread at
    every op, so multi-threaded timings measure the neighbours more than the model.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    results = {
        name: run_dora_set(rounds, batch, seq) if name == "d" else run_set(name, rounds, batch, seq, swap_cycles)
        for name in sets
    }
    return {
        "model": f"Llama hidden 512, 8 layers, vocab {VOCAB}; LoRA on {', '.join(LLAMA_PROJECTIONS)}",
        "input": f"batch {batch} x {seq} tokens",
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "sets": results,
        "targets": check_targets(results),
    }


def print_forward(result: Mapping[str, Any]) -> None:
    console = Console(width=150)
    console.print(
        f"{result['model']}; {result['input']}; {result['rounds']} alternating rounds, {result['threads']} threads"
    )
    for name, note in MODE_NOTES.items():
        console.print(f"  {name}: {note}")
    for set_result in result["sets"].values():
        if set_result.get("dora"):
            _print_dora(set_result, console)
            continue
        forward = set_result["forward_median_s"]
        errors = set_result["max_abs_error_vs_peft_eager"]
        print_table(
            set_result["title"],
            [
                "mode",
                "LoRA ranks computed",
                "forward (median)",
                "vs base",
                "overhead",
                "swap (median)",
                "max |diff| vs PEFT eager",
            ],
            [
                (
                    name,
                    set_result["padded_ranks"][name],
                    format_seconds(seconds),
                    f"{set_result['vs_base'][name]:.3f}x",
                    "-" if name == BASE else format_seconds(set_result["overhead_s"][name]),
                    format_seconds(set_result["swap_median_s"][name]) if name in set_result["swap_median_s"] else "-",
                    f"{errors[name]:.1e}" if name in errors else "-",
                )
                for name, seconds in forward.items()
            ],
            console,
        )
        console.print(f"graphs compiled during swaps: {set_result['graphs_compiled_during_swaps']}")
    print_table(
        "targets",
        ["target", "measured", "met"],
        [(t["target"], t["measured"], "yes" if t["met"] else "NO") for t in result["targets"]],
        console,
    )


def _print_dora(result: Mapping[str, Any], console: Console) -> None:
    rows = [(name, format_seconds(seconds)) for name, seconds in result["forward_median_s"].items()]
    rows += [(name, format_seconds(seconds)) for name, seconds in result["swap_median_s"].items()]
    print_table(result["title"], ["row", "median"], rows, console)
    console.print(f"DoRA max |diff| vs PEFT eager: {result['max_abs_error_vs_peft_eager']:.1e}")


def plot_forward(result: Mapping[str, Any], path: Path) -> None:
    values = {
        f"({set_name}) {mode}": seconds * 1e3
        for set_name, set_result in result["sets"].items()
        for mode, seconds in set_result["forward_median_s"].items()
        if not set_result.get("dora")
    }
    plot_bars(path, f"Per-forward median ({result['input']})", values, unit="ms")
