"""``loraswap bench mixed``: one compiled forward serving a batch whose rows use different adapters.

A Llama-style model (hidden 256, 4 layers) with four PEFT adapters of ranks 4-32 on different
targets, a batch of 8 rows x 32 tokens, two rows per adapter, every model on the default capacity.
For each dtype (fp32, bf16), timed in alternating rounds: the routed compiled batch with 4, 8 and
16 resident slots (slot ``s`` holds adapter ``s % 4``; rows spread over the slots), the same model
with one slot (the same capacity: union of targets, largest rank; all rows on its adapter: the
one-adapter cost to match), a one-slot model sized for its adapter alone (rank 4 on two targets:
what the union capacity itself costs), the 4-slot batch with all rows on one adapter (each of the four in turn,
and their mean: a row's gather reads only its adapter's live rank rows, so a batch on the rank-4 adapter costs less
than one on the rank-32 one, and the mean does the same adapter work as the routed batch), PEFT's eager
``adapter_names=`` batch, swapping per adapter group (activate + one compiled forward per group) and the compiled
base model. Then a serving loop in which every
batch brings a new mix: loraswap re-routes, while PEFT's compiled ``adapter_names=`` model
recompiles for each mix (so only a few of its mixes are measured and its cost is reported per mix).
"""

from __future__ import annotations

import copy
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..attach import attach
from ..capacity import Capacity
from ..compile_guard import CompileCounter
from ..testing.synthetic import peft_multi_adapter, tiny_llama, write_adapters
from .report import format_seconds, plot_bars, print_table
from .timing import alternating_medians

MIXED_ADAPTERS = {
    "attn-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "attn-r8": dict(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj"]),
    "mlp-r16": dict(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all-r32": dict(r=32, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
}
ROWS, TOKENS, VOCAB = 8, 32, 1024


def _new_mixes(count: int, slots: int, seed: int) -> list[list[int]]:
    """``count`` distinct row -> slot mixes, each using every slot at least once."""
    rng = random.Random(seed)
    mixes: list[list[int]] = []
    while len(mixes) < count:
        mix = list(range(slots)) + [rng.randrange(slots) for _ in range(ROWS - slots)]
        rng.shuffle(mix)
        if mix not in mixes:
            mixes.append(mix)
    return mixes


RESIDENT_SLOTS = (4, 8, 16)
# A round times every mode once (about 0.15 s). Over 15 rounds, the routed batch's ratio to the all-rows-on-one-adapter
# mean ranged 0.939-0.979 in six runs back to back; over 50 rounds, 0.960-0.972 (2026-11-28, fp32 and bf16).
DEFAULT_ROUNDS = 50
# Every compiled model here runs the same forward code, so each model (and the per-group batch size) is one more
# graph of the same frames: past dynamo's default limit of 8 the rest would silently run eagerly.
RECOMPILE_LIMIT = 32
# Static shapes: the graphs of a frame are shared by every model whose guards they pass, so with automatic dynamic
# shapes the per-group mode's 2-row batches would compile a dynamic-batch graph that the 4-slot models' 8-row
# batches then ran, and each mode would be timed on whichever graph the modes before it had compiled.
DYNAMIC = False
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def routed_mode(slots: int) -> str:
    return f"routed batch, {slots} resident slots (compiled)"


ONE_SLOT = "one-slot model, same capacity, all rows on its adapter (compiled)"
OWN_CAPACITY = "one-slot model sized for attn-r4 alone (compiled)"
ONE_ADAPTER = "4-slot model, all rows on one adapter: mean of the four below"


def all_rows_on(name: str) -> str:
    return f"4-slot model, all rows on {name} (compiled)"


PEFT_EAGER = "PEFT eager adapter_names= batch"
PER_GROUP = "swap per adapter group: activate + compiled forward x4"
BASE = "compiled base model, no LoRA"


def spread_mix(resident: int) -> list[int]:
    """Row -> slot: row ``r`` uses adapter ``r % 4`` from a slot spread over all ``resident`` slots."""
    adapters = len(MIXED_ADAPTERS)
    return [row % adapters + adapters * (row % (resident // adapters)) for row in range(ROWS)]


def _attached(base: torch.nn.Module, paths: dict[str, Path], resident: int, sized_for: list[Path] | None = None):
    """A compiled copy of ``base`` on the default capacity for ``sized_for`` (default: every adapter in
    ``paths``), slot ``s`` holding adapter ``s % len(paths)``."""
    model = copy.deepcopy(base)
    capacity = Capacity.for_adapters(sized_for or paths.values(), model=model, slots=resident)
    slots = attach(model, capacity)
    sources = list(paths.values())
    for slot in range(resident):
        slots.load(sources[slot % len(sources)], slot=slot)
    return slots, torch.compile(model, dynamic=DYNAMIC)


def run_mixed(
    rounds: int = DEFAULT_ROUNDS,
    new_mixes: int = 12,
    peft_mixes: int = 3,
    seed: int = 0,
    dtypes: tuple[str, ...] = tuple(DTYPES),
) -> dict[str, Any]:
    """Run the benchmark for each dtype; returns medians (seconds), ratios and the serving loops' figures."""
    torch.manual_seed(seed)
    base = tiny_llama(hidden=256, layers=4, vocab=VOCAB, seed=seed)
    tokens = torch.randint(0, VOCAB, (ROWS, TOKENS))
    with tempfile.TemporaryDirectory() as directory, torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        paths = write_adapters(base, Path(directory), MIXED_ADAPTERS)
        runs = {}
        for dtype in dtypes:
            torch._dynamo.reset()  # the previous dtype's graphs (PEFT's per-mix ones too) count against the limit
            runs[dtype] = _run_dtype(
                copy.deepcopy(base).to(DTYPES[dtype]), paths, tokens, rounds, new_mixes, peft_mixes, seed
            )
    return {
        "model": f"Llama hidden 256, 4 layers, vocab {VOCAB}; batch {ROWS} x {TOKENS} tokens",
        "adapters": {name: spec["r"] for name, spec in MIXED_ADAPTERS.items()},
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "dtypes": runs,
    }


def _run_dtype(base, paths, tokens, rounds: int, new_mixes: int, peft_mixes: int, seed: int) -> dict[str, Any]:
    names = list(MIXED_ADAPTERS)
    routed = {resident: _attached(base, paths, resident) for resident in RESIDENT_SLOTS}
    first = {names[0]: paths[names[0]]}
    one_slot, one_slot_compiled = _attached(base, first, 1, sized_for=list(paths.values()))
    own, own_compiled = _attached(base, first, 1)
    peft_model = peft_multi_adapter(base, paths)
    compiled_base = torch.compile(copy.deepcopy(base), dynamic=DYNAMIC)
    slots4, compiled4 = routed[4]
    mix = spread_mix(4)
    group_tokens = {slot: tokens[[row for row, s in enumerate(mix) if s == slot]] for slot in sorted(set(mix))}
    peft_names = [names[slot] for slot in mix]

    def routed_batch(resident: int):
        slots, compiled = routed[resident]
        resident_mix = spread_mix(resident)

        def run() -> None:
            slots.route(resident_mix)
            compiled(tokens)

        return run

    def all_on(slots, compiled, slot: int = 0):
        def run() -> None:
            slots.activate(slot)
            compiled(tokens)

        return run

    def per_group() -> None:
        for slot, rows in group_tokens.items():
            slots4.activate(slot)
            compiled4(rows)

    modes = {
        **{routed_mode(resident): routed_batch(resident) for resident in RESIDENT_SLOTS},
        ONE_SLOT: all_on(one_slot, one_slot_compiled),
        OWN_CAPACITY: all_on(own, own_compiled),
        **{all_rows_on(name): all_on(slots4, compiled4, slot) for slot, name in enumerate(names)},
        PEFT_EAGER: lambda: peft_model(tokens, adapter_names=peft_names),
        PER_GROUP: per_group,
        BASE: lambda: compiled_base(tokens),
    }
    with torch.no_grad():
        medians = _with_one_adapter_mean(alternating_medians(modes, rounds=rounds, warmup=2), names)
        serving = _serving_loop(slots4, compiled4, peft_model, tokens, names, new_mixes, peft_mixes, seed)
    routed4 = medians[routed_mode(4)]
    return {
        "mix": mix,
        "medians_s": medians,
        "speedup_of_routed_batch": {name: seconds / routed4 for name, seconds in medians.items()},
        "serving": serving,
    }


def _with_one_adapter_mean(medians: dict[str, float], names: list[str]) -> dict[str, float]:
    """``medians`` with the mean of the all-rows-on-one-adapter modes inserted just before them."""
    per_adapter = [all_rows_on(name) for name in names]
    ordered = {}
    for mode, seconds in medians.items():
        if mode == per_adapter[0]:
            ordered[ONE_ADAPTER] = statistics.fmean(medians[name] for name in per_adapter)
        ordered[mode] = seconds
    return ordered


def _serving_loop(slots, compiled, peft_model, tokens, names, new_mixes: int, peft_mixes: int, seed: int) -> dict:
    """Every batch brings a mix not seen before: loraswap re-routes, PEFT's compiled model recompiles."""
    mixes = _new_mixes(new_mixes + peft_mixes, len(names), seed + 1)
    loraswap_seconds = []
    with CompileCounter() as loraswap_graphs:
        for mix in mixes[:new_mixes]:
            start = time.perf_counter()
            slots.route(mix)
            compiled(tokens)
            loraswap_seconds.append(time.perf_counter() - start)
    torch._dynamo.reset()
    peft_compiled = torch.compile(peft_model)
    peft_seconds = []
    with CompileCounter() as peft_graphs:
        for mix in mixes[new_mixes:]:
            start = time.perf_counter()
            peft_compiled(tokens, adapter_names=[names[slot] for slot in mix])
            peft_seconds.append(time.perf_counter() - start)
    loraswap_per_batch = statistics.median(loraswap_seconds)
    peft_per_mix = statistics.median(peft_seconds)
    return {
        "loraswap_batches": new_mixes,
        "loraswap_median_per_batch_s": loraswap_per_batch,
        "loraswap_total_s": sum(loraswap_seconds),
        "loraswap_graphs_compiled": loraswap_graphs.graphs,
        "peft_mixes_measured": peft_mixes,
        "peft_compiled_median_per_mix_s": peft_per_mix,
        "peft_compiled_graphs_compiled": peft_graphs.graphs,
        "peft_compiled_estimated_total_s": peft_per_mix * new_mixes,
        "speedup": peft_per_mix / loraswap_per_batch,
    }


# mode -> (what the routed 4-slot batch is compared with, the bound, whether the bound is a ceiling)
TARGETS = {
    routed_mode(4): ("time / one-slot model", 1.1, True),
    routed_mode(16): ("time / one-slot model", 1.2, True),
    ONE_ADAPTER: ("routed 4-slot speedup", 0.95, False),
    PEFT_EAGER: ("routed 4-slot speedup", 1.5, False),
    PER_GROUP: ("routed 4-slot speedup", 1.0, False),
}
SERVING_TARGET = 100


def target_cell(name: str, medians: dict[str, float]) -> str:
    if name not in TARGETS:
        return ""
    what, bound, ceiling = TARGETS[name]
    if ceiling:
        value = medians[name] / medians[ONE_SLOT]
        return f"{what} {value:.2f}x <= {bound}x {'ok' if value <= bound else 'MISSED'}"
    value = medians[name] / medians[routed_mode(4)]
    return f">= {bound}x {'ok' if value >= bound else 'MISSED'}"


def print_mixed(result: dict[str, Any]) -> None:
    console = Console(width=160)
    tokens = ROWS * TOKENS
    for dtype, run in result["dtypes"].items():
        medians = run["medians_s"]
        rows = [
            (
                name,
                format_seconds(seconds),
                f"{tokens / seconds:,.0f}",
                f"{run['speedup_of_routed_batch'][name]:.2f}x",
                target_cell(name, medians),
            )
            for name, seconds in medians.items()
        ]
        print_table(
            f"loraswap bench mixed, {dtype}: {result['model']}, {result['rounds']} alternating rounds, "
            f"{result['threads']} threads, default capacity",
            ["mode", "median", "tokens/s", "routed 4-slot speedup", "target"],
            rows,
            console,
        )
        _print_serving(run["serving"], dtype, console)


def _print_serving(serving: dict[str, Any], dtype: str, console: Console) -> None:
    print_table(
        f"serving loop, {dtype}: every batch brings a new mix ({serving['loraswap_batches']} for loraswap, "
        f"{serving['peft_mixes_measured']} measured for PEFT compiled)",
        ["mode", "per batch (median)", f"{serving['loraswap_batches']} batches", "graphs compiled", "speedup"],
        [
            (
                "loraswap route + compiled forward (4 slots)",
                format_seconds(serving["loraswap_median_per_batch_s"]),
                format_seconds(serving["loraswap_total_s"]),
                serving["loraswap_graphs_compiled"],
                f"{serving['speedup']:.0f}x {'ok' if serving['speedup'] >= SERVING_TARGET else 'MISSED'} "
                f"(target >= {SERVING_TARGET}x)",
            ),
            (
                "PEFT compiled adapter_names=",
                format_seconds(serving["peft_compiled_median_per_mix_s"]),
                f"~{format_seconds(serving['peft_compiled_estimated_total_s'])} (estimated)",
                serving["peft_compiled_graphs_compiled"],
                "1x",
            ),
        ],
        console,
    )


def plot_mixed(result: dict[str, Any], path: Path) -> None:
    values = {
        f"{name} [{dtype}]": seconds * 1e3
        for dtype, run in result["dtypes"].items()
        for name, seconds in run["medians_s"].items()
    }
    plot_bars(
        path,
        "bench mixed: median forward, 8 x 32 tokens",
        values,
        unit="ms",
        reference=next(iter(values.values())),
        reference_label="routed batch, 4 slots, first dtype",
    )
