"""``loraswap bench forward``'s DoRA rows: what serving a DoRA adapter costs next to a plain LoRA of the same rank.

One capacity with DoRA room (``Capacity.dora``) on the benchmark's Llama, compiled once, timed in alternating
rounds against the same capacity holding a plain adapter of the same rank and targets:

- one slot, DoRA active vs plain active (target: <= 1.1x the plain forward);
- a routed batch of 4 slots (max_blend 1) with half the rows on DoRA adapters vs the same batch on plain ones
  (target: <= 1.15x);
- a swap from the host cache, DoRA vs plain of the same rank (target: <= 1.2x; the norm is computed once,
  when the adapter is packed, so a swap is the same copy plus one small vector per layer).

Each DoRA output is checked against PEFT's eager model before timing.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attach import attach
from ..capacity import Capacity
from ..testing.synthetic import peft_reference, write_adapters, write_dora_adapter
from .timing import alternating_samples

ROUTED_SLOTS = 4


def dora_rows(base: nn.Module, spec: Mapping[str, Any], directory: Path, tokens: torch.Tensor, rounds: int) -> dict:
    """Forward and swap medians of DoRA vs plain adapters of one ``spec`` (a LoraConfig dict), in seconds."""
    plain = list(write_adapters(base, directory / "plain", {f"plain-{i}": spec for i in range(2)}).values())
    dora = [write_dora_adapter(base, directory / f"dora-{i}", seed=20 + i, **spec) for i in range(2)]
    reference = peft_reference(base, dora[0])(tokens[:1]).logits
    rows = tokens[:1].expand(ROUTED_SLOTS, -1).contiguous()
    with_plain, plain_slots = _attached(base, [*plain, *dora], slots=1)  # the same capacity, DoRA room included
    with_dora, one_slots = _attached(base, [*plain, *dora], slots=1)
    routed, routed_slots = _attached(base, [*plain, *dora], slots=ROUTED_SLOTS, max_batch=ROUTED_SLOTS)
    for slot, path in enumerate([plain[0], plain[1], dora[0], dora[1]]):
        routed_slots.load(path, slot=slot)
    plain_slots.load(plain[0])
    one_slots.load(dora[0])
    error = (with_dora.compiled(tokens[:1]).logits - reference).abs().max().item()

    def routed_forward(ids: list[int]):
        return lambda: (routed_slots.route(ids), routed.compiled(rows))

    samples = alternating_samples(
        {
            "one slot, plain": lambda: with_plain.compiled(tokens[:1]),
            "one slot, DoRA": lambda: with_dora.compiled(tokens[:1]),
            "routed, plain rows": routed_forward([0, 1, 0, 1]),
            "routed, half DoRA rows": routed_forward([0, 2, 1, 3]),
        },
        rounds=rounds,
        warmup=3,
    )
    forward = {name: statistics.median(values) for name, values in samples.items()}
    swaps = _swap_medians(one_slots, {"swap, plain": plain, "swap, DoRA": dora})
    return {
        "forward_median_s": forward,
        "swap_median_s": swaps,
        "dora_vs_plain": forward["one slot, DoRA"] / forward["one slot, plain"],
        "routed_half_dora_vs_plain": forward["routed, half DoRA rows"] / forward["routed, plain rows"],
        "swap_dora_vs_plain": swaps["swap, DoRA"] / swaps["swap, plain"],
        "max_abs_error_vs_peft_eager": error,
    }


class _Compiled:
    def __init__(self, model: nn.Module) -> None:
        self.compiled = torch.compile(model)


def _attached(base: nn.Module, paths: list[Path], **options: Any):
    model = copy.deepcopy(base)
    slots = attach(model, Capacity.for_adapters(paths, model=model, **options))
    return _Compiled(model), slots


def _swap_medians(slots, sets: Mapping[str, list[Path]], cycles: int = 20) -> dict[str, float]:
    """Median ``load`` time per set of adapters, the sets interleaved in each cycle (from the host cache after the
    first pass), so that both see the same machine."""
    for paths in sets.values():
        for path in paths:
            slots.load(path)
    seconds: dict[str, list[float]] = {name: [] for name in sets}
    for _ in range(cycles):
        for name, paths in sets.items():
            for path in paths:
                start = time.perf_counter()
                slots.load(path)
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def dora_targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {"target": "DoRA active, one slot <= 1.1x plain LoRA of the same rank",
         "measured": f"{result['dora_vs_plain']:.3f}x", "met": result["dora_vs_plain"] <= 1.1},
        {"target": "routed batch, half the rows DoRA <= 1.15x all plain",
         "measured": f"{result['routed_half_dora_vs_plain']:.3f}x", "met": result["routed_half_dora_vs_plain"] <= 1.15},
        {"target": "DoRA swap from the host cache <= 1.2x plain",
         "measured": f"{result['swap_dora_vs_plain']:.3f}x", "met": result["swap_dora_vs_plain"] <= 1.2},
    ]  # fmt: skip
