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
from loraswap.formats.safetensors import ReadBuffer
from loraswap.testing.synthetic import peft_reference, write_peft_adapter


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


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16, torch.float32, torch.float16)])
def test_every_tensor_reads_back_exactly_whatever_the_dtypes(llama_adapters, tmp_path, dtypes):
    """A whole-file read views one buffer: one split for a file of one dtype, a view per tensor otherwise; into a
    fresh buffer or a reused one, every tensor is the one saved."""
    saved = load_file(llama_adapters["attn-r2"] / "adapter_model.safetensors")
    saved = {key: tensor.to(dtypes[index % len(dtypes)]) for index, (key, tensor) in enumerate(sorted(saved.items()))}
    path = tmp_path / "adapter.safetensors"
    save_file(saved, path)
    scratch = ReadBuffer()
    for buffer in (None, scratch, scratch):
        layers = loraswap.load_adapter(path, scratch=buffer).layers
        read = {f"base_model.model.{name}.{role}.weight": getattr(layer, role)
                for name, layer in layers.items() for role in ("lora_A", "lora_B")}
        assert read.keys() == saved.keys()
        for key, tensor in saved.items():
            assert read[key].dtype == tensor.dtype and torch.equal(read[key], tensor), key


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


def test_the_one_read_of_a_file_gives_what_safetensors_reads(llama_adapters):
    """load_adapter reads a safetensors file with one readinto and views; the tensors are safetensors' own."""
    for path in llama_adapters.values():
        adapter = loraswap.load_adapter(path)
        expected = load_file(str(path / "adapter_model.safetensors"))
        for name, layer in adapter.layers.items():
            key = f"base_model.model.{name}"
            suffixes = (".lora_A.weight", ".lora_B.weight") if f"{key}.lora_A.weight" in expected else (
                ".lora_embedding_A", ".lora_embedding_B"
            )
            assert torch.equal(layer.lora_A, expected[key + suffixes[0]])
            assert torch.equal(layer.lora_B, expected[key + suffixes[1]])
