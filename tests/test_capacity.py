"""Capacity.for_adapters over a catalogue: from safetensors headers and configs, no tensor read."""

from __future__ import annotations

import json

import pytest

import loraswap
import loraswap.capacity
from loraswap.testing.synthetic import write_peft_adapter


@pytest.mark.parametrize("per_layer_rank", [False, True])
def test_headers_give_the_capacity_the_loaded_adapters_give(llama_base, llama_adapters, monkeypatch, per_layer_rank):
    loaded = [loraswap.load_adapter(path) for path in llama_adapters.values()]
    expected = loraswap.Capacity.for_adapters(loaded, model=llama_base, slots=3, per_layer_rank=per_layer_rank)

    def refuse(*args, **kwargs):
        raise AssertionError("Capacity.for_adapters read an adapter's tensors")

    monkeypatch.setattr(loraswap.capacity, "load_adapter", refuse)
    from_headers = loraswap.Capacity.for_adapters(
        llama_adapters.values(), model=llama_base, slots=3, per_layer_rank=per_layer_rank
    )
    assert from_headers == expected


def test_an_adapter_a_load_refuses_is_refused_with_the_load_error(llama_base, llama_adapters, tmp_path):
    dora = write_peft_adapter(llama_base, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))  # PEFT rejects this DoRA
    with pytest.raises(loraswap.UnsupportedAdapterError, match="DoRA with lora_bias"):
        loraswap.Capacity.for_adapters([llama_adapters["attn-r2"], dora])
