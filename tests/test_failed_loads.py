"""Invariant 2 (docs/design.md): a load either completes or raises a HotswapError with the model bit-for-bit as before."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraswap
from conftest import assert_outputs_unchanged, snapshot
from loraswap.errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    CapacityError,
    NonFiniteError,
    PickleRefusedError,
    ShapeMismatchError,
    SlotError,
)
from loraswap.testing.synthetic import write_peft_adapter


@pytest.fixture(scope="module")
def served(llama_base, llama_adapters):
    """A model with capacity for the attention adapters only (rank <= 16, no MLP layers), one adapter loaded."""
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity(max_rank=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], slots=2)
    slots = loraswap.attach(model, capacity)
    slots.load(llama_adapters["attn-r2"])
    return model, slots


def rewrite_adapter(source, target, transform):
    """Copy a PEFT adapter directory, passing its state dict through ``transform``."""
    shutil.copytree(source, target)
    weights = target / "adapter_model.safetensors"
    save_file(transform(load_file(weights)), weights)
    return target


def with_first_tensor(fn):
    def transform(state):
        key = max(k for k in state if "lora_B" in k)  # the last layer: a late error
        state[key] = fn(state[key])
        return state

    return transform


def bad_inputs(adapters, base, tmp):
    attn = adapters["attn-r2"]
    cases = {
        "target outside capacity": (adapters["mlp-r32-rslora"], CapacityError, "add it to Capacity.target_modules"),
        "missing path": (tmp / "nope", AdapterNotFoundError, "no such file"),
    }
    rank_over = write_peft_adapter(base, tmp / "r32", r=32, target_modules=["q_proj", "v_proj"])
    cases["rank over capacity"] = (rank_over, CapacityError, "raise Capacity.max_rank")
    truncated = shutil.copytree(attn, tmp / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated safetensors"] = (truncated, AdapterFormatError, "truncated")
    bad_json = shutil.copytree(attn, tmp / "bad-json")
    (bad_json / "adapter_config.json").write_text('{"r": 2, "lora_alpha": ')
    cases["invalid JSON config"] = (bad_json, AdapterFormatError, "invalid JSON")
    cases["shape mismatch"] = (
        rewrite_adapter(attn, tmp / "shape", with_first_tensor(lambda t: torch.zeros(t.shape[0] + 1, t.shape[1]))),
        ShapeMismatchError,
        "the layer needs",
    )
    cases["NaN weights"] = (
        rewrite_adapter(attn, tmp / "nan", with_first_tensor(lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))),
        NonFiniteError,
        "NaN or infinite",
    )
    pickled = shutil.copytree(attn, tmp / "pickled")
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    cases[".bin without allow_pickle"] = (pickled, PickleRefusedError, "allow_pickle=True")
    dora = shutil.copytree(attn, tmp / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    cases["DoRA without magnitudes"] = (dora, AdapterFormatError, "has no lora_magnitude_vector")
    return cases


def test_bad_inputs_raise_and_leave_the_model_bit_identical(served, llama_base, llama_adapters, llama_tokens, tmp_path):
    model, slots = served
    cases = bad_inputs(llama_adapters, llama_base, tmp_path)
    before = snapshot(model)
    with torch.no_grad():
        logits_before = model(llama_tokens).logits
    for case, (source, error, message) in cases.items():
        with pytest.raises(error) as raised:
            slots.load(source, slot=0)
        assert isinstance(raised.value, loraswap.HotswapError), case
        if message:
            assert message in str(raised.value), (case, str(raised.value))
        assert_outputs_unchanged(model, before, llama_tokens, logits_before)


def test_rank_over_capacity_names_the_layer_and_the_fix(served, llama_base, tmp_path):
    _, slots = served
    path = write_peft_adapter(llama_base, tmp_path / "r32", r=32, target_modules=["q_proj"])
    expected = r"layer 'model\.layers\.0\.self_attn\.q_proj'.*rank 32.*raise Capacity\.max_rank .* to 32"
    with pytest.raises(CapacityError, match=expected):
        slots.load(path)


def test_pickle_is_read_only_when_allowed(served, llama_base, llama_adapters, llama_tokens, tmp_path):
    model, slots = served
    pickled = bad_inputs(llama_adapters, llama_base, tmp_path)[".bin without allow_pickle"][0]
    slots.load(pickled, slot=1, allow_pickle=True)
    slots.activate(1)
    with torch.no_grad():
        via_pickle = model(llama_tokens).logits
    slots.load(llama_adapters["attn-r2"], slot=1)
    with torch.no_grad():
        assert torch.equal(model(llama_tokens).logits, via_pickle)
    slots.activate(0)


def test_bad_slot_ids_are_refused(served, llama_adapters):
    _, slots = served
    with pytest.raises(SlotError, match="outside the 2 slot"):
        slots.load(llama_adapters["attn-r2"], slot=2)
    with pytest.raises(SlotError):
        slots.activate(-1)


def test_a_value_beyond_the_model_dtype_is_refused_before_any_write(llama_base, llama_adapters):
    """An fp32 adapter value an fp16 slot cannot hold would load as inf: refused, slot untouched."""
    model = copy.deepcopy(llama_base).half()
    path = llama_adapters["attn-r2"]
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters([path], model=model))
    adapter = loraswap.load_adapter(path)
    name, layer = next(iter(adapter.layers.items()))
    huge = dict(adapter.layers, **{name: loraswap.LayerLora(layer.lora_A * 1e7, layer.lora_B, layer.scaling)})
    before = [weights.clone() for weights in slots.storage.weights]
    with pytest.raises(NonFiniteError, match=rf"layer '{name}': lora_A holds .*beyond what the model's dtype holds"):
        slots.load(loraswap.Adapter(huge, source="huge"))
    assert all(torch.equal(old, new) for old, new in zip(before, slots.storage.weights))
