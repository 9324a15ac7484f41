"""Per-layer rank capacity: each layer's slot buffers sized to its own largest rank, checked against PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import loraswap
from loraswap.errors import CapacityError
from loraswap.layers import SlotLayer
from loraswap.testing.synthetic import peft_reference, write_adapters

ATOL = 1e-4


def slot_ranks(model: nn.Module) -> dict[str, int]:
    return {name: int(m.lora_A.shape[1]) for name, m in model.named_modules() if isinstance(m, SlotLayer)}


def largest_ranks(sources) -> dict[str, int]:
    """Module name -> the largest rank any of the adapters gives it, read from the adapters themselves."""
    ranks: dict[str, int] = {}
    for source in sources:
        for name, layer in loraswap.load_adapter(source).layers.items():
            ranks[name] = max(ranks.get(name, 0), int(layer.lora_A.shape[0]))
    return ranks


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers(remove_duplicate=False))
    return {name: t.detach().clone() for name, t in tensors.items()}


def assert_bit_identical(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    now = snapshot(model)
    assert now.keys() == expected.keys()
    assert all(torch.equal(now[name], expected[name]) for name in now)


def test_each_layer_is_sized_to_its_largest_rank_and_untouched_layers_stay_plain(llama_base, llama_adapters):
    sources = [llama_adapters["attn-r2"], llama_adapters["mixed-patterns"]]
    expected = largest_ranks(sources)
    assert len(set(expected.values())) > 2, "the adapters must give layers different ranks"
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity.for_adapters(sources, model=model, per_layer_rank=True)
    assert capacity.layer_ranks == expected
    assert capacity.max_rank == max(expected.values())
    slots = loraswap.attach(model, capacity)
    assert slot_ranks(model) == expected
    untouched = [name for name, m in model.named_modules() if name.endswith(("gate_proj", "up_proj", "lm_head"))]
    assert untouched and all(type(model.get_submodule(name)) is nn.Linear for name in untouched)
    uniform = loraswap.attach(copy.deepcopy(llama_base), loraswap.Capacity.for_adapters(sources))
    assert slots.layout.slot_nbytes < uniform.layout.slot_nbytes


def test_per_layer_slots_match_peft_eager_compiled_without_recompiles(llama_base, llama_adapters, llama_tokens):
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity.for_adapters(llama_adapters.values(), model=model, per_layer_rank=True, slots=2)
    slots = loraswap.attach(model, capacity)
    assert slot_ranks(model) == largest_ranks(llama_adapters.values())
    with torch.no_grad():
        references = {
            name: peft_reference(llama_base, path)(llama_tokens).logits for name, path in llama_adapters.items()
        }
        base_logits = llama_base(llama_tokens).logits
        compiled = torch.compile(model, backend="aot_eager")  # recompiles are dynamo's; inductor: test_core_llama
        compiled(llama_tokens)
        with loraswap.no_recompile():
            for index, name in enumerate(list(llama_adapters) * 2):
                slot = index % 2
                slots.load(llama_adapters[name], slot=slot)
                slots.activate(slot)
                assert not torch.allclose(references[name], base_logits, atol=1e-3)
                torch.testing.assert_close(compiled(llama_tokens).logits, references[name], atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def pattern_capacity():
    """Sized exactly for the 'mixed-patterns' adapter by rank pattern: o_proj 4, layer 1's k_proj 16, else 8."""
    return loraswap.Capacity(
        max_rank=8,
        target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
        layer_ranks={"o_proj": 4, "layers.1.self_attn.k_proj": 16},
    )


@pytest.mark.parametrize("mode", ["slots", "fused"])
def test_explicit_rank_per_pattern_loads_what_fits_and_refuses_what_does_not(
    llama_base, llama_adapters, llama_tokens, pattern_capacity, tmp_path, mode
):
    model = copy.deepcopy(llama_base)
    handle = loraswap.attach(model, pattern_capacity, mode=mode)
    if mode == "slots":
        ranks = slot_ranks(model)
        assert ranks["model.layers.0.self_attn.o_proj"] == 4
        assert ranks["model.layers.1.self_attn.k_proj"] == 16
        assert ranks["model.layers.0.self_attn.k_proj"] == ranks["model.layers.1.mlp.down_proj"] == 8
    handle.load(llama_adapters["mixed-patterns"])
    with torch.no_grad():
        reference = peft_reference(llama_base, llama_adapters["mixed-patterns"])(llama_tokens).logits
        torch.testing.assert_close(model(llama_tokens).logits, reference, atol=ATOL, rtol=0)
    before = snapshot(model)
    too_big = write_adapters(llama_base, tmp_path, {"o-r8": dict(r=8, target_modules=["q_proj", "o_proj"])})["o-r8"]
    with pytest.raises(
        CapacityError,
        match=r"layer 'model.layers.0.self_attn.o_proj': the adapter's rank 8 exceeds the capacity's rank 4 there; "
        r"raise .* to 8",
    ):
        handle.load(too_big)
    assert_bit_identical(model, before)


@pytest.mark.parametrize("mode", ["slots", "fused"])
def test_a_rank_pattern_that_sizes_no_layer_is_refused(llama_base, mode):
    capacity = loraswap.Capacity(max_rank=8, target_modules=["q_proj", "v_proj"], layer_ranks={"q_prj": 16})
    model = copy.deepcopy(llama_base)
    with pytest.raises(CapacityError, match="layer_ranks key 'q_prj' matches none of the 4 targeted layers"):
        loraswap.attach(model, capacity, mode=mode)
    assert not any(isinstance(m, SlotLayer) for m in model.modules())


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_layer_ranks_must_be_positive_ints(rank):
    with pytest.raises(CapacityError, match="Capacity.layer_ranks\\['q_proj'\\] is"):
        loraswap.Capacity(max_rank=8, target_modules=["q_proj"], layer_ranks={"q_proj": rank})
