"""Invariant 6 (docs/design.md) for the verbs: a verb that cannot take effect raises, and a wrong order is named.

Each case asserts the exception type, that the message names the cause, and that the model is
bit-for-bit as it was before the refused call.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_outputs_unchanged, snapshot

import loraswap
from loraswap.errors import AttachOrderError, LayoutChangedError, RecompileError, SlotError


VERBS = {
    "activate": lambda slots, paths: slots.activate(1),
    "route": lambda slots, paths: slots.route([1, 0, -1]),
    "blend": lambda slots, paths: slots.blend({0: 0.5, 1: 0.5}),
    "blend rows": lambda slots, paths: slots.blend([{0: 1.0}, {1: 1.0}]),
    "unload": lambda slots, paths: slots.unload(0),
    "load": lambda slots, paths: slots.load(paths[1], slot=0),
}
FUSED_VERBS = ("activate", "unload", "load")  # route and blend raise ModeError in fused mode whatever the layout


@pytest.mark.parametrize(
    "mode, verb", [*(("slots", verb) for verb in VERBS), *(("fused", verb) for verb in FUSED_VERBS)]
)
def test_every_verb_after_a_cast_raises_and_changes_nothing(llama_base, llama_adapters, llama_tokens, mode, verb):
    model = copy.deepcopy(llama_base)
    paths = [llama_adapters["attn-r2"], llama_adapters["mixed-patterns"]]
    capacity = loraswap.Capacity.for_adapters(paths, model=model, slots=2)
    slots = loraswap.attach(model, capacity, mode=mode, cache_bytes=0)
    for slot, path in enumerate(paths):
        slots.load(path, slot=slot)
    model.double()
    before = snapshot(model)
    with torch.no_grad():
        logits_before = model(llama_tokens).logits
    with pytest.raises(LayoutChangedError, match="moved(,| or) cast"):
        VERBS[verb](slots, paths)
    assert_outputs_unchanged(model, before, llama_tokens, logits_before)


def test_attach_refuses_a_compiled_model(llama_base, llama_tokens):
    model = copy.deepcopy(llama_base)
    compiled = torch.compile(model, backend="eager")
    before = snapshot(model)
    with torch.no_grad():
        logits_before = model(llama_tokens).logits
    with pytest.raises(AttachOrderError, match=r"torch.compile'd model.*attach to the model first, then compile"):
        loraswap.attach(compiled, loraswap.Capacity(max_rank=4, target_modules=["q_proj"]))
    assert not any(isinstance(m, loraswap.layers.SlotLayer) for m in model.modules())
    assert_outputs_unchanged(model, before, llama_tokens, logits_before)


def test_attach_after_the_first_compiled_call_names_the_order(llama_base, llama_tokens):
    torch._dynamo.reset()  # earlier tests' models may have spent the frame's recompile budget
    model = copy.deepcopy(llama_base)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(llama_tokens)
        loraswap.attach(model, loraswap.Capacity(max_rank=4, target_modules=["q_proj"]))
        with pytest.raises(RecompileError, match="attach must precede the first compiled call"):
            with loraswap.no_recompile():
                compiled(llama_tokens)


def test_a_recompile_attach_did_not_cause_is_not_blamed_on_attach(llama_base, llama_tokens):
    torch._dynamo.reset()
    model = copy.deepcopy(llama_base)
    loraswap.attach(model, loraswap.Capacity(max_rank=4, target_modules=["q_proj"]))
    compiled = torch.compile(model, backend="eager", dynamic=False)
    with torch.no_grad():
        compiled(llama_tokens)
        with pytest.raises(RecompileError) as raised, loraswap.no_recompile():
            compiled(llama_tokens[:, :5])
    assert "attach must precede" not in str(raised.value)


@pytest.fixture(scope="module")
def checked(llama_base, llama_adapters, llama_tokens):
    """A model attached with ``check_rows=True``, compiled once (eager backend: the check is not in the graph)."""
    model = copy.deepcopy(llama_base)
    paths = [llama_adapters["attn-r2"], llama_adapters["mixed-patterns"]]
    capacity = loraswap.Capacity.for_adapters(paths, model=model, slots=2, max_blend=2)  # per-token routing
    slots = loraswap.attach(model, capacity, cache_bytes=0, check_rows=True)
    for slot, path in enumerate(paths):
        slots.load(path, slot=slot)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(llama_tokens)
        compiled(llama_tokens[:2])  # a second batch size: dynamo makes the batch dimension dynamic
    return model, slots, compiled


ROW_MISMATCHES = {
    "fewer ids than rows": (
        lambda slots: slots.route([0, 1]),
        r"batch has 3 rows but the last route\(\)/blend\(\) gave 2",
    ),
    "more ids than rows": (lambda slots: slots.route([0, 1, -1, 1]), "3 rows but .* gave 4"),
    "blend rows": (lambda slots: slots.blend([{0: 1.0}, {1: 0.5}]), "3 rows but .* gave 2"),
    "per token": (lambda slots: slots.route([0] * 26, per_token=True), "27 tokens but .* gave 26"),
}


@pytest.mark.parametrize("case", ROW_MISMATCHES)
def test_check_rows_refuses_a_batch_the_routing_does_not_cover(checked, llama_tokens, case):
    model, slots, compiled = checked
    route, message = ROW_MISMATCHES[case]
    slots.activate(0)  # any batch size may follow activate (or one blend mapping for every row)
    before = snapshot(model)
    with torch.no_grad(), loraswap.no_recompile():
        logits_before = compiled(llama_tokens).logits
        route(slots)
        with pytest.raises(SlotError, match=message):
            compiled(llama_tokens)
    slots.activate(0)
    assert_outputs_unchanged(model, before, llama_tokens, logits_before)


def test_check_rows_passes_matching_batches_without_recompiling(checked, llama_base, llama_adapters, llama_tokens):
    model, slots, compiled = checked
    with torch.no_grad(), loraswap.no_recompile():
        slots.activate(1)
        activated = compiled(llama_tokens).logits
        slots.route([1, 1, 1])
        torch.testing.assert_close(compiled(llama_tokens).logits, activated, atol=1e-6, rtol=0)
        slots.route([1, -1])
        routed = compiled(llama_tokens[:2]).logits
        slots.blend({0: 1.0})
        compiled(llama_tokens)
        slots.route([1] * llama_tokens.numel(), per_token=True)
        compiled(llama_tokens)
    torch.testing.assert_close(routed[0], activated[0], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(routed[1], llama_base(llama_tokens[1:2]).logits[0], atol=1e-6, rtol=0)


def test_check_rows_is_refused_in_fused_mode(llama_base):
    model = copy.deepcopy(llama_base)
    with pytest.raises(loraswap.ModeError, match="check_rows"):
        loraswap.attach(model, loraswap.Capacity(max_rank=4, target_modules=["q_proj"]), mode="fused", check_rows=True)
