"""A swap copies only the rank rows an adapter fills and zeroes only what the slot's previous adapter left
beyond them; the slot must still hold exactly the zero-padded adapter, whatever was loaded there before."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loraswap
from loraswap import Capacity, attach

from conftest import LLAMA_ADAPTERS

NAMES = sorted(LLAMA_ADAPTERS)
CAPACITIES = {
    "uniform": {},
    "per-layer-rank": {"per_layer_rank": True},  # several rank blocks per row
}
STEPS = st.lists(st.tuples(st.sampled_from([*NAMES, None]), st.booleans()), min_size=1, max_size=8)


def slot_row(slots, slot: int) -> list[torch.Tensor]:
    return [t[slot] for t in (*slots.storage.weights, *slots.storage.scales)]


def padded(slots, path) -> list[torch.Tensor]:
    """The adapter zero-padded into a whole slot row: what a copy of every padded byte would leave in a slot."""
    packed = slots.read_packed(path)
    return [*packed.weights, *packed.scales]


@pytest.fixture(scope="module", params=list(CAPACITIES))
def attached(request, llama_base, llama_adapters):
    """(cached slots, cache-less slots, each adapter zero-padded), attached with one capacity."""
    capacity = Capacity.for_adapters(llama_adapters.values(), model=llama_base, slots=2, **CAPACITIES[request.param])
    cached = attach(copy.deepcopy(llama_base), capacity)
    direct = attach(copy.deepcopy(llama_base), capacity, cache_bytes=0)
    return cached, direct, {name: padded(cached, path) for name, path in llama_adapters.items()}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS)
def test_after_any_sequence_of_loads_a_slot_holds_exactly_the_padded_adapter(attached, llama_adapters, steps):
    """Loads of larger and smaller ranks and other targets, unloads, through the cache and straight from the file."""
    cached, direct, expected = attached
    for name, through_cache in steps:
        slots = cached if through_cache else direct
        if name is None:
            slots.unload(1)
        else:
            slots.load(llama_adapters[name], slot=1)
        want = expected[name] if name is not None else [torch.zeros_like(t) for t in slot_row(slots, 1)]
        for got, reference in zip(slot_row(slots, 1), want, strict=True):
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
    with torch.no_grad():
        compiled(llama_tokens)
        with loraswap.no_recompile():
            for name in order:
                slots.load(llama_adapters[name])
                assert torch.equal(compiled(llama_tokens).logits, fresh[name]), name
