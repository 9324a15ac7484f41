"""``generate()`` with a KV cache: every row keeps its own adapter across prefill and decode steps."""

from __future__ import annotations

import copy

import pytest
import torch

import loraswap
from loraswap.testing.synthetic import peft_reference

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(0, 96, (5, 6), generator=torch.Generator().manual_seed(11))


def greedy(model: torch.nn.Module, prompts: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )


@pytest.fixture(scope="module")
def per_adapter_generations(llama_base, llama_adapters, prompts):
    """What each adapter generates alone (PEFT's eager model), and the base model."""
    outputs = {name: greedy(peft_reference(llama_base, path), prompts) for name, path in llama_adapters.items()}
    outputs["base"] = greedy(llama_base, prompts)
    return outputs


@pytest.fixture(scope="module")
def attached(llama_base, llama_adapters):
    model = copy.deepcopy(llama_base)
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters(llama_adapters.values(), model=model, slots=4))
    for slot, path in enumerate(llama_adapters.values()):
        slots.load(path, slot=slot)
    return model, slots


def test_adapters_change_what_is_generated(per_adapter_generations):
    """Guards the test below against adapters too weak to change a greedy token."""
    distinct = {tuple(tokens.flatten().tolist()) for tokens in per_adapter_generations.values()}
    assert len(distinct) == len(per_adapter_generations)


@pytest.mark.parametrize("ids", [[0, 1, 2, 3, -1], [3, -1, 3, 0, 1]])
def test_per_row_generation_matches_per_adapter_generation(attached, per_adapter_generations, llama_adapters, prompts, ids):
    model, slots = attached
    names = list(llama_adapters)
    slots.route(ids)
    generated = greedy(model, prompts)
    assert generated.shape == (len(ids), prompts.shape[1] + NEW_TOKENS)
    for row, slot in enumerate(ids):
        expected = per_adapter_generations["base" if slot == -1 else names[slot]][row]
        assert generated[row].tolist() == expected.tolist(), f"row {row} (slot {slot}) diverged"


def test_compiled_generation_keeps_rows_on_their_adapters(attached, per_adapter_generations, llama_adapters, prompts):
    """The compiled forward serves prefill and every decode step; a second mix reuses its graphs."""
    model, slots = attached
    names = list(llama_adapters)
    torch._dynamo.reset()
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, dynamic=True)
    try:
        first, second = [2, 0, -1, 1, 3], [1, 3, 0, -1, 2]
        slots.route(first)
        greedy(model, prompts)
        slots.route(second)
        with loraswap.no_recompile():
            generated = greedy(model, prompts)
    finally:
        model.forward = eager_forward
    for row, slot in enumerate(second):
        expected = per_adapter_generations["base" if slot == -1 else names[slot]][row]
        assert generated[row].tolist() == expected.tolist(), f"row {row} (slot {slot}) diverged"
