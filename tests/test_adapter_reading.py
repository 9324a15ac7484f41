"""Reading adapters: PEFT directories, lone safetensors files, hub ids from the offline cache, scalings."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraswap
from loraswap.synthetic import peft_reference, write_peft_adapter


def test_scalings_follow_rank_pattern_alpha_pattern_and_rslora(llama_adapters):
    mixed = loraswap.load_adapter(llama_adapters["mixed-patterns"])
    layers = mixed.layers
    assert layers["model.layers.0.self_attn.q_proj"].scaling == 32 / 8
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 16 / 8
    assert layers["model.layers.0.self_attn.o_proj"].rank == 4
    assert layers["model.layers.0.self_attn.o_proj"].scaling == 16 / 4
    assert layers["model.layers.1.self_attn.k_proj"].rank == 16
    assert layers["model.layers.0.self_attn.k_proj"].rank == 8
    assert layers["model.layers.1.mlp.down_proj"].scaling == 3 / 8
    rslora = loraswap.load_adapter(llama_adapters["mlp-r32-rslora"])
    assert all(layer.scaling == 8 / math.sqrt(32) for layer in rslora.layers.values())


def test_embedding_adapter_ignores_the_saved_base_embedding(llama_adapters):
    adapter = loraswap.load_adapter(llama_adapters["embed-and-v"])
    assert adapter.layers["model.embed_tokens"].lora_A.shape == (16, 96)
    assert all("base_layer" not in name for name in adapter.layers)


def test_lone_safetensors_file_without_config_has_scaling_one(llama_adapters, tmp_path):
    lone = tmp_path / "lone.safetensors"
    shutil.copy(llama_adapters["attn-r2"] / "adapter_model.safetensors", lone)
    adapter = loraswap.load_adapter(lone)
    assert {layer.scaling for layer in adapter.layers.values()} == {1.0}
    assert adapter.target_names == loraswap.load_adapter(llama_adapters["attn-r2"]).target_names


def test_lone_safetensors_file_with_config_in_its_header(llama_adapters, tmp_path):
    config = (llama_adapters["attn-r2"] / "adapter_config.json").read_text()
    lone = tmp_path / "with-metadata.safetensors"
    save_file(load_file(llama_adapters["attn-r2"] / "adapter_model.safetensors"), lone,
              metadata={"lora_adapter_metadata": config})
    assert {layer.scaling for layer in loraswap.load_adapter(lone).layers.values()} == {4 / 2}


def test_hub_id_resolves_offline_from_the_local_cache(llama_adapters, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    snapshot = tmp_path / "models--someone--tiny-lora" / "snapshots" / ("0" * 40)
    shutil.copytree(llama_adapters["attn-r2"], snapshot)
    (tmp_path / "models--someone--tiny-lora" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-lora" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    from_hub = loraswap.load_adapter("someone/tiny-lora")
    local = loraswap.load_adapter(llama_adapters["attn-r2"])
    assert from_hub.target_names == local.target_names
    for name, layer in local.layers.items():
        assert torch.equal(from_hub.layers[name].lora_A, layer.lora_A)
    with pytest.raises(loraswap.AdapterNotFoundError, match="not resolvable as a hub id"):
        loraswap.load_adapter("someone/absent-lora")


def test_non_lora_peft_types_are_refused(llama_adapters, tmp_path):
    ia3 = shutil.copytree(llama_adapters["attn-r2"], tmp_path / "ia3")
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(loraswap.UnsupportedAdapterError, match="IA3"):
        loraswap.load_adapter(ia3)


def test_foreign_safetensors_keys_are_refused_before_reading_tensors(tmp_path):
    foreign = tmp_path / "model.safetensors"
    save_file({"model.layers.0.mlp.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(loraswap.AdapterFormatError, match="not a PEFT LoRA key"):
        loraswap.load_adapter(foreign)


def test_lora_bias_matches_peft(llama_base, llama_tokens, tmp_path):
    path = write_peft_adapter(llama_base, tmp_path / "bias", r=4, lora_alpha=8, lora_bias=True,
                              target_modules=["q_proj", "down_proj"])
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity.for_adapters([path], model=model)
    assert capacity.lora_bias
    slots = loraswap.attach(model, capacity)
    slots.load(path)
    with torch.no_grad():
        expected = peft_reference(llama_base, path)(llama_tokens).logits
        torch.testing.assert_close(model(llama_tokens).logits, expected, atol=1e-5, rtol=0)


def test_a_mapped_read_equals_the_copied_read(llama_adapters):
    """Slot packing reads tensors as views of the file's memory map: same layers, scalings and values."""
    from loraswap.adapter import read_adapter

    for path in llama_adapters.values():
        copied, mapped = loraswap.load_adapter(path), read_adapter(path, mapped=True)
        assert copied.layers.keys() == mapped.layers.keys()
        for name, layer in copied.layers.items():
            other = mapped.layers[name]
            assert layer.scaling == other.scaling
            assert torch.equal(layer.lora_A, other.lora_A) and torch.equal(layer.lora_B, other.lora_B)
