"""Property tests: random ranks, targets and alphas always match PEFT after a swap, in any order; any sequence of
routing writes leaves exactly the last one in the tables the slot layers read."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loraswap
from loraswap.errors import SlotError
from loraswap.routing import Router
from loraswap.testing.synthetic import LLAMA_PROJECTIONS, peft_reference, write_peft_adapter

adapter_specs = st.fixed_dictionaries(
    {
        "r": st.integers(1, 12),
        "lora_alpha": st.sampled_from([1, 2, 3.5, 8, 16]),
        "target_modules": st.lists(st.sampled_from(LLAMA_PROJECTIONS), min_size=1, max_size=4, unique=True),
        "use_rslora": st.booleans(),
    }
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(adapter_specs, min_size=2, max_size=3), slots=st.integers(1, 2))
def test_random_adapters_match_peft_after_swaps(llama_base, llama_tokens, specs, slots):
    with tempfile.TemporaryDirectory() as directory:
        paths = [write_peft_adapter(llama_base, Path(directory) / str(i), seed=i, **spec) for i, spec in enumerate(specs)]
        model = copy.deepcopy(llama_base)
        handle = loraswap.attach(model, loraswap.Capacity.for_adapters(paths, model=model, slots=slots))
        with torch.no_grad():
            for index, path in enumerate(paths):
                slot = index % slots
                handle.load(path, slot=slot)
                handle.activate(slot)
                expected = peft_reference(llama_base, path)(llama_tokens).logits
                torch.testing.assert_close(model(llama_tokens).logits, expected, atol=1e-5, rtol=0)
            for slot in range(slots):
                handle.unload(slot)
            assert torch.equal(model(llama_tokens).logits, llama_base(llama_tokens).logits)


ROUTER_SLOTS, ROUTER_ROWS = 4, 6
slot_ids = st.integers(0, ROUTER_SLOTS - 1)
blend_rows = st.dictionaries(slot_ids, st.floats(-2, 2, width=32), max_size=2)
routing_writes = st.one_of(
    st.tuples(st.just("activate"), slot_ids, st.just(False)),
    st.tuples(st.just("route"), st.lists(st.integers(-1, ROUTER_SLOTS - 1), max_size=ROUTER_ROWS), st.booleans()),
    st.tuples(st.just("blend"), blend_rows, st.just(False)),
    st.tuples(st.just("blend"), st.lists(blend_rows, max_size=ROUTER_ROWS), st.just(False)),
)


def routing_of(router: Router) -> torch.Tensor:
    """The ``[rows, slots]`` weights the layers read, from whichever tables the router keeps."""
    if router.row_slots is None:
        return router.row_weights.clone()
    assert 0 <= int(router.row_slots.min()) and int(router.row_slots.max()) < router.slots  # gathered unchecked
    return torch.zeros(router.rows, router.slots).scatter_add_(1, router.row_slots, router.row_terms)


def expected_routing(kind: str, arg, rows: int) -> torch.Tensor:
    table = torch.zeros(rows, ROUTER_SLOTS)
    if kind == "activate":
        table[:, arg] = 1
    elif kind == "route":
        for row, slot in enumerate(arg):
            if slot != -1:  # -1: the base model only, the row stays zero
                table[row, slot] = 1
    else:
        for row, weights in enumerate([arg] * rows if isinstance(arg, dict) else arg):
            for slot, weight in weights.items():
                table[row, slot] = weight
    return table


@settings(max_examples=200, deadline=None)
@given(max_blend=st.sampled_from([1, 2, ROUTER_SLOTS]), writes=st.lists(routing_writes, min_size=1, max_size=6))
def test_routing_tables_hold_exactly_the_last_write(max_blend, writes):
    router = Router(ROUTER_SLOTS, ROUTER_ROWS, torch.device("cpu"), max_blend=max_blend)
    for kind, arg, per_token in writes:
        per_token = per_token and router.row_slots is None  # gathering capacities refuse per-token routing
        expected = expected_routing(kind, arg, router.rows)
        if int((expected != 0).sum(dim=1).max()) > router.max_blend:
            before = routing_of(router), bool(router.per_token)
            with pytest.raises(SlotError, match="max_blend"):
                getattr(router, kind)(arg)
            assert torch.equal(routing_of(router), before[0]) and bool(router.per_token) == before[1]
            continue
        if kind == "route":
            router.route(arg, per_token=per_token)
        else:
            getattr(router, kind)(arg)
        assert torch.equal(routing_of(router), expected), (kind, arg)
        assert bool(router.per_token) == per_token
