"""``loraswap demo``: one compiled tiny Llama, three PEFT adapters, many swaps, zero recompiles."""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .attach import attach
from .bench.report import format_seconds, print_table
from .capacity import Capacity
from .compile_guard import CompileCounter, no_recompile
from .testing.synthetic import peft_reference, tiny_llama, write_adapters

DEMO_ADAPTERS = {
    "attention-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "mlp-r16-rslora": dict(r=16, lora_alpha=16, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "mixed-r32": dict(
        r=32,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
        rank_pattern={"o_proj": 8},
        alpha_pattern={"down_proj": 64},
    ),
}


def run_demo(
    rounds: int = 5, seed: int = 0, backend: str = "inductor", progress: Callable[[str], None] = lambda step: None
) -> list[dict]:
    """Swap through the demo adapters ``rounds`` times on one compiled model; one row per adapter.

    The first round's loads are cold (read from disk); later rounds' are warm (from the host cache),
    so ``warm_swap_median_s`` is None with one round. ``progress`` is told each step as it starts.
    """
    if rounds < 1:
        raise ValueError(f"rounds is {rounds}; the demo needs at least one round")
    torch.manual_seed(seed)
    progress("building a tiny random Llama and writing 3 adapters with PEFT")
    base = tiny_llama(hidden=128, layers=2, vocab=256)
    tokens = torch.randint(0, 256, (2, 16))
    with tempfile.TemporaryDirectory() as directory:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations inside PEFT
            paths = write_adapters(base, Path(directory), DEMO_ADAPTERS)
            progress("computing PEFT's eager outputs (the references)")
            references = {name: peft_reference(base, path)(tokens).logits for name, path in paths.items()}
        model = copy.deepcopy(base)
        slots = attach(model, Capacity.for_adapters(paths.values(), model=model))
        compiled = torch.compile(model, backend=backend)
        swap_seconds: dict[str, list[float]] = {name: [] for name in paths}
        errors: dict[str, float] = {name: 0.0 for name in paths}
        with torch.no_grad():
            progress(f"compiling the model once with torch.compile, backend {backend} (inductor: ~30 s on 2 CPU cores)")
            compiled(tokens)  # the one compilation
            with CompileCounter() as counter, no_recompile():
                for round_ in range(rounds):
                    progress(f"round {round_ + 1}/{rounds}: swapping {len(paths)} adapters, no recompilation allowed")
                    for name, path in paths.items():
                        start = time.perf_counter()
                        slots.load(path)
                        swap_seconds[name].append(time.perf_counter() - start)
                        error = (compiled(tokens).logits - references[name]).abs().max().item()
                        errors[name] = max(errors[name], error)
    return [
        {
            "adapter": name,
            "first_load_s": swap_seconds[name][0],
            "warm_swap_median_s": statistics.median(swap_seconds[name][1:]) if rounds > 1 else None,
            "recompiles": counter.graphs,
            "max_abs_error": errors[name],
        }
        for name in paths
    ]


def print_demo(rows: list[dict]) -> None:
    print_table(
        "loraswap demo: tiny Llama compiled once, adapters swapped in place",
        ["adapter", "first load", "warm swap (median)", "recompiles", "max abs error vs PEFT eager"],
        [
            (
                row["adapter"],
                format_seconds(row["first_load_s"]),
                "-" if row["warm_swap_median_s"] is None else format_seconds(row["warm_swap_median_s"]),
                row["recompiles"],
                f"{row['max_abs_error']:.2e}",
            )
            for row in rows
        ],
    )
