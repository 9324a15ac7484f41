"""The core contract on a tiny Llama: compile once, swap through adapters, match PEFT, never recompile."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import LLAMA_ADAPTERS

import loraswap
from loraswap.testing.synthetic import peft_reference


@pytest.fixture(scope="module")
def references(llama_base, llama_adapters, llama_tokens):
    with torch.no_grad():
        return {name: peft_reference(llama_base, path)(llama_tokens).logits for name, path in llama_adapters.items()}


def test_every_adapter_changes_the_output(llama_base, references, llama_tokens):
    with torch.no_grad():
        base_logits = llama_base(llama_tokens).logits
    for reference in references.values():
        assert not torch.allclose(reference, base_logits, atol=1e-3)


@pytest.fixture(scope="module")
def attached(llama_base, llama_adapters):
    model = copy.deepcopy(llama_base)
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters(llama_adapters.values(), model=model))
    return model, slots


def tensor_state(model: torch.nn.Module) -> dict[str, tuple]:
    """Every parameter and buffer's identity: shape, dtype, device and storage."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers(remove_duplicate=False))
    return {name: (t.shape, t.dtype, t.device, t.data_ptr()) for name, t in tensors.items()}


def python_state(model: torch.nn.Module) -> dict[str, dict]:
    """Every module's plain Python attributes (what dynamo guards on)."""
    return {
        name: {key: value for key, value in vars(module).items() if not key.startswith("_")}
        for name, module in model.named_modules()
    }


def test_capacity_is_union_of_targets_and_max_rank(llama_adapters, llama_base):
    capacity = loraswap.Capacity.for_adapters(llama_adapters.values(), model=llama_base)
    assert capacity.max_rank == 32
    wrapped = {name.rsplit(".", 1)[-1] for name in capacity.target_modules}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"}


def test_empty_slot_is_exactly_the_base_model(llama_base, attached, llama_tokens):
    model, slots = attached
    slots.unload(0)
    with torch.no_grad():
        assert torch.equal(model(llama_tokens).logits, llama_base(llama_tokens).logits)


@pytest.mark.parametrize("name", list(LLAMA_ADAPTERS))
def test_eager_load_matches_peft(attached, llama_adapters, references, llama_tokens, name):
    model, slots = attached
    slots.load(llama_adapters[name])
    with torch.no_grad():
        torch.testing.assert_close(model(llama_tokens).logits, references[name], atol=1e-5, rtol=0)


def test_compiled_swaps_in_shuffled_order_never_recompile(attached, llama_adapters, references, llama_tokens):
    model, slots = attached
    compiled = torch.compile(model)
    order = list(llama_adapters) * 3
    random.Random(0).shuffle(order)
    slots.load(llama_adapters[order[0]])
    with torch.no_grad():
        compiled(llama_tokens)
        before_tensors, before_python = tensor_state(model), python_state(model)
        with torch._dynamo.config.patch(error_on_recompile=True), loraswap.no_recompile():
            for name in order:
                slots.load(llama_adapters[name])
                torch.testing.assert_close(compiled(llama_tokens).logits, references[name], atol=1e-4, rtol=0)
            slots.unload(0)
            compiled(llama_tokens)
    assert tensor_state(model) == before_tensors
    assert python_state(model) == before_python


def test_second_slot_and_activate(llama_base, llama_adapters, references, llama_tokens):
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity.for_adapters(llama_adapters.values(), model=model, slots=2)
    slots = loraswap.attach(model, capacity)
    slots.load(llama_adapters["attn-r2"], slot=0)
    slots.load(llama_adapters["mlp-r32-rslora"], slot=1)
    with torch.no_grad():
        torch.testing.assert_close(model(llama_tokens).logits, references["attn-r2"], atol=1e-5, rtol=0)
        slots.activate(1)
        torch.testing.assert_close(model(llama_tokens).logits, references["mlp-r32-rslora"], atol=1e-5, rtol=0)
    assert slots.loaded == {0: str(llama_adapters["attn-r2"] / "adapter_model.safetensors"),
                            1: str(llama_adapters["mlp-r32-rslora"] / "adapter_model.safetensors")}
