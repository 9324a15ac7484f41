"""A swap copies only the rank rows an adapter fills (and the slot's live mask); rows past them keep whatever a
previous adapter left there, masked out. What every layer serves must still be exactly the zero-padded adapter,
whatever was loaded before, and the outputs exactly those of a slot that only ever held it."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loraswap
from loraswap import Capacity, attach

from conftest import LLAMA_ADAPTERS, holds_rows_past_live, slot_row

NAMES = sorted(LLAMA_ADAPTERS)
CAPACITIES = {
    "uniform": {},
    "per-layer-rank": {"per_layer_rank": True},  # several rank blocks per row
}
STEPS = st.lists(st.tuples(st.sampled_from([*NAMES, None]), st.booleans()), min_size=1, max_size=8)


def served(layout, weights, scales, live) -> list[torch.Tensor]:
    """What the forward reads of one slot row (one tensor per group in each of ``weights``/``scales``/``live``), per
    layer: ``lora_A``/``lora_B`` with the rank rows that are not live zeroed, the scale and the bias; then the live
    masks."""
    tensors = []
    for name, place in layout.placements.items():
        group = place.group
        lora_A, lora_B, scale, rows, bias = layout.views(weights[group], scales[group], live[group], name)
        tensors += [lora_A * rows.reshape(-1, *[1] * (lora_A.dim() - 1)), lora_B * rows, scale]
        tensors += [] if bias is None else [bias]
    return tensors + list(live)


def served_by_slot(slots, slot: int) -> list[torch.Tensor]:
    return served(slots.layout, *slot_row(slots, slot))


def padded(slots, path) -> list[torch.Tensor]:
    """What a slot layer would serve of the adapter zero-padded into a whole fresh slot row."""
    packed = slots.read_packed(path)
    return served(slots.layout, packed.weights, packed.scales, packed.live)


@pytest.fixture(scope="module", params=list(CAPACITIES))
def attached(request, llama_base, llama_adapters):
    """(cached slots, cache-less slots, each adapter zero-padded), attached with one capacity."""
    capacity = Capacity.for_adapters(llama_adapters.values(), model=llama_base, slots=2, **CAPACITIES[request.param])
    cached = attach(copy.deepcopy(llama_base), capacity)
    direct = attach(copy.deepcopy(llama_base), capacity, cache_bytes=0)
    return cached, direct, {name: padded(cached, path) for name, path in llama_adapters.items()}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS)
def test_after_any_sequence_of_loads_a_slot_serves_exactly_the_padded_adapter(attached, llama_adapters, steps):
    """Loads of larger and smaller ranks and other targets, unloads, through the cache and straight from the file."""
    cached, direct, expected = attached
    for name, through_cache in steps:
        slots = cached if through_cache else direct
        if name is None:
            slots.unload(1)
        else:
            slots.load(llama_adapters[name], slot=1)
        serves = served_by_slot(slots, 1)
        want = expected[name] if name is not None else [torch.zeros_like(t) for t in serves]
        for got, reference in zip(serves, want, strict=True):
            assert torch.equal(got, reference)


def test_swaps_down_in_rank_give_the_fresh_slots_outputs_compiled_without_recompiles(
    llama_base, llama_adapters, llama_tokens
):
    """Each adapter after every other one, bit-for-bit the output of a model that only ever loaded it (fp32)."""
    capacity = Capacity.for_adapters(llama_adapters.values(), model=llama_base, slots=1)
    model = copy.deepcopy(llama_base)
    slots = attach(model, capacity)
    compiled = torch.compile(model, backend="eager")
    fresh = {}
    for name, path in llama_adapters.items():
        reference = copy.deepcopy(llama_base)
        attach(reference, capacity).load(path)
        with torch.no_grad():
            fresh[name] = reference(llama_tokens).logits
    order = [name for previous in NAMES for name in (previous, *NAMES)]  # every adapter right after every other
    masked_stale_rows = False
    with torch.no_grad():
        compiled(llama_tokens)
        with loraswap.no_recompile():
            for name in order:
                slots.load(llama_adapters[name])
                assert torch.equal(compiled(llama_tokens).logits, fresh[name]), name
                masked_stale_rows |= holds_rows_past_live(slots, 0)
    assert masked_stale_rows, "no swap down in rank left rows behind: the mask was never exercised"
