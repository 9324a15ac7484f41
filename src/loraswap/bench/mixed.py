"""``loraswap bench mixed``: one compiled forward serving a batch whose rows use different adapters.

A Llama-style model (hidden 256, 4 layers) with four PEFT adapters of ranks 4-32 on different
targets, a batch of 8 rows x 32 tokens, two rows per adapter. Timed in alternating rounds:
the routed compiled batch, the same batch on one adapter, PEFT's eager ``adapter_names=`` batch,
swapping per adapter group (activate + one compiled forward per group) and the compiled base
model. Then a serving loop in which every batch brings a new mix: loraswap re-routes, while
PEFT's compiled ``adapter_names=`` model recompiles for each mix (so only a few of its mixes are
measured and its cost is reported per mix).
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
from ..synthetic import peft_multi_adapter, tiny_llama, write_adapters
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


def run_mixed(rounds: int = 15, new_mixes: int = 12, peft_mixes: int = 3, seed: int = 0) -> dict[str, Any]:
    """Run the benchmark; returns medians (seconds), ratios and the serving loop's figures."""
    torch.manual_seed(seed)
    base = tiny_llama(hidden=256, layers=4, vocab=VOCAB, seed=seed)
    tokens = torch.randint(0, VOCAB, (ROWS, TOKENS))
    mix = [row % len(MIXED_ADAPTERS) for row in range(ROWS)]
    groups = {slot: [row for row, s in enumerate(mix) if s == slot] for slot in sorted(set(mix))}
    names = list(MIXED_ADAPTERS)
    with tempfile.TemporaryDirectory() as directory:
        paths = write_adapters(base, Path(directory), MIXED_ADAPTERS)
        model = copy.deepcopy(base)
        # Routing only (one adapter per row): gather each row's slot instead of computing all four.
        capacity = Capacity.for_adapters(paths.values(), model=model, slots=len(paths), max_blend=1)
        slots = attach(model, capacity)
        for slot, path in enumerate(paths.values()):
            slots.load(path, slot=slot)
        peft_model = peft_multi_adapter(base, paths)
    compiled = torch.compile(model)
    compiled_base = torch.compile(copy.deepcopy(base))
    group_tokens = {slot: tokens[rows] for slot, rows in groups.items()}
    peft_names = [names[slot] for slot in mix]

    def mixed() -> None:
        slots.route(mix)
        compiled(tokens)

    def single() -> None:
        slots.activate(0)
        compiled(tokens)

    def per_group() -> None:
        for slot, rows in group_tokens.items():
            slots.activate(slot)
            compiled(rows)

    modes = {
        "routed batch: 8 rows over 4 adapters (compiled)": mixed,
        "same batch, all rows on one adapter (compiled)": single,
        "PEFT eager adapter_names= batch": lambda: peft_model(tokens, adapter_names=peft_names),
        "swap per adapter group: activate + compiled forward x4": per_group,
        "compiled base model, no LoRA": lambda: compiled_base(tokens),
    }
    with torch.no_grad():
        medians = alternating_medians(modes, rounds=rounds, warmup=2)
        serving = _serving_loop(slots, compiled, peft_model, tokens, names, new_mixes, peft_mixes, seed)
    mixed_s = medians[next(iter(modes))]
    return {
        "model": f"Llama hidden 256, 4 layers, vocab {VOCAB}; batch {ROWS} x {TOKENS} tokens",
        "adapters": {name: spec["r"] for name, spec in MIXED_ADAPTERS.items()},
        "mix": mix,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "medians_s": medians,
        "speedup_of_routed_batch": {name: seconds / mixed_s for name, seconds in medians.items()},
        "serving": serving,
    }


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


TARGETS = {
    "same batch, all rows on one adapter (compiled)": 0.9,
    "PEFT eager adapter_names= batch": 1.2,
    "swap per adapter group: activate + compiled forward x4": 1.0,
}


def print_mixed(result: dict[str, Any]) -> None:
    console = Console(width=140)
    tokens = ROWS * TOKENS
    rows = []
    for name, seconds in result["medians_s"].items():
        ratio = result["speedup_of_routed_batch"][name]
        target = TARGETS.get(name)
        rows.append(
            (
                name,
                format_seconds(seconds),
                f"{tokens / seconds:,.0f}",
                f"{ratio:.2f}x",
                "" if target is None else f">= {target}x {'ok' if ratio >= target else 'MISSED'}",
            )
        )
    print_table(
        f"loraswap bench mixed: {result['model']}, {result['rounds']} alternating rounds, "
        f"{result['threads']} threads",
        ["mode", "median", "tokens/s", "routed batch speedup", "target"],
        rows,
        console,
    )
    serving = result["serving"]
    print_table(
        f"serving loop: every batch brings a new mix ({serving['loraswap_batches']} for loraswap, "
        f"{serving['peft_mixes_measured']} measured for PEFT compiled)",
        ["mode", "per batch (median)", f"{serving['loraswap_batches']} batches", "graphs compiled", "speedup"],
        [
            (
                "loraswap route + compiled forward",
                format_seconds(serving["loraswap_median_per_batch_s"]),
                format_seconds(serving["loraswap_total_s"]),
                serving["loraswap_graphs_compiled"],
                f"{serving['speedup']:.0f}x {'ok' if serving['speedup'] >= 100 else 'MISSED'} (target >= 100x)",
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
    values = {name: seconds * 1e3 for name, seconds in result["medians_s"].items()}
    plot_bars(
        path,
        "bench mixed: median forward, 8 x 32 tokens",
        values,
        unit="ms",
        reference=next(iter(values.values())),
        reference_label="routed batch",
    )
