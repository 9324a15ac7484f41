"""``loraswap.inspect``: all from header and config, checked against the readers of PEFT, diffusers and loraswap."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraswap
from conftest import UNET_LORA
from loraswap.formats.lora_keys import FORMAT_DIFFUSERS, FORMAT_KOHYA, FORMAT_PEFT_DIR, FORMAT_PEFT_FILE
from loraswap.testing import synthetic_diffusers
from loraswap.testing.synthetic import write_peft_adapter

def tiny_unet():
    return synthetic_diffusers.tiny_unet(channels=8, cross_attention_dim=8)


def unet_lora_state_dict(rank_pattern=None):
    """A UNet LoRA as PEFT trains it inside diffusers (``unet.add_adapter``): PEFT keys, random non-zero factors."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet()
    config = LoraConfig(init_lora_weights=False, rank_pattern=rank_pattern or {}, **UNET_LORA)
    unet.add_adapter(config)
    return get_peft_model_state_dict(unet), config


@pytest.fixture(scope="module")
def diffusers_files(tmp_path_factory):
    """One UNet LoRA written three ways by diffusers: save_lora_weights (PEFT keys + LoraConfig in the header),
    convert_state_dict_to_diffusers (legacy lora.down/up keys), convert_state_dict_to_kohya (A1111 keys)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    directory = tmp_path_factory.mktemp("diffusers-loras")
    state_dict, config = unet_lora_state_dict(rank_pattern={"proj_in": 2})
    StableDiffusionPipeline.save_lora_weights(
        directory / "diffusers", unet_lora_layers=state_dict, unet_lora_adapter_metadata=config.to_dict()
    )
    legacy = convert_state_dict_to_diffusers({f"unet.{key}": value for key, value in state_dict.items()})
    save_file({key: value.contiguous() for key, value in legacy.items()}, directory / "legacy.safetensors")
    kohya = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in state_dict.items()})
    first_alpha = min(key for key in kohya if key.endswith(".alpha"))
    kohya[first_alpha] = torch.tensor(2.0)  # one layer with its own alpha, as kohya trainers write
    save_file({key: value.contiguous() for key, value in kohya.items()}, directory / "kohya.safetensors")
    return {
        "diffusers": directory / "diffusers",
        "legacy": directory / "legacy.safetensors",
        "kohya": directory / "kohya.safetensors",
        "peft_state_dict": state_dict,
        "first_alpha": first_alpha,
    }


def test_peft_directories_match_load_adapter(llama_adapters):
    for name, path in llama_adapters.items():
        info = loraswap.inspect(path)
        adapter = loraswap.load_adapter(path)
        config = json.loads((path / "adapter_config.json").read_text())
        assert info.format == FORMAT_PEFT_DIR
        assert set(info.layers) == set(adapter.layers), name
        for module, layer in adapter.layers.items():
            assert info.layers[module].rank == layer.rank
            assert info.layers[module].scaling == pytest.approx(layer.scaling, rel=1e-12)
            assert info.layers[module].lora_A_shape == tuple(layer.lora_A.shape)
        assert info.rank == adapter.max_rank
        assert info.parameter_bytes == adapter.nbytes
        assert info.use_rslora == config["use_rslora"]
        assert set(info.target_modules) == set(config["target_modules"])
        assert info.dtypes == ("F32",)
        assert not info.unsupported
    patterns = loraswap.inspect(llama_adapters["mixed-patterns"])
    assert patterns.ranks == (4, 8, 16)
    assert patterns.layers["model.layers.1.self_attn.k_proj"].rank == 16
    assert patterns.layers["model.layers.0.self_attn.q_proj"].alpha == 32


def test_lone_peft_file_has_no_config_and_scaling_one(llama_adapters, tmp_path):
    lone = tmp_path / "lone.safetensors"
    shutil.copy(llama_adapters["attn-r2"] / "adapter_model.safetensors", lone)
    info = loraswap.inspect(lone)
    adapter = loraswap.load_adapter(lone)
    assert info.format == FORMAT_PEFT_FILE
    assert info.layer_ranks == {name: layer.rank for name, layer in adapter.layers.items()}
    assert info.scalings == (1.0,) == tuple({layer.scaling for layer in adapter.layers.values()})


def test_diffusers_save_lora_weights_file_gives_ranks_and_scalings_from_its_header_config(diffusers_files):
    info = loraswap.inspect(diffusers_files["diffusers"])
    peft_keys = diffusers_files["peft_state_dict"]
    assert info.format == FORMAT_DIFFUSERS
    assert info.components == ("unet",)
    assert len(info.layers) == len(peft_keys) // 2
    assert all(name.startswith("unet.") for name in info.layers)
    assert set(info.target_modules) == set(UNET_LORA["target_modules"])
    for name, layer in info.layers.items():
        expected_rank = peft_keys[name[len("unet.") :] + ".lora_A.weight"].shape[0]
        assert layer.rank == expected_rank
        assert layer.scaling == UNET_LORA["lora_alpha"] / expected_rank  # the header's LoraConfig, rank_pattern applied
    assert info.ranks == (2, 4)


def test_legacy_diffusers_keys_are_described_with_scaling_one(diffusers_files):
    info = loraswap.inspect(diffusers_files["legacy"])
    assert info.format == FORMAT_DIFFUSERS
    assert len(info.layers) == len(diffusers_files["peft_state_dict"]) // 2
    assert info.ranks == (2, 4)
    assert info.scalings == (1.0,)  # no alpha anywhere: diffusers' meaning is alpha = rank


def test_kohya_alphas_match_diffusers_reader(diffusers_files):
    from diffusers import StableDiffusionPipeline

    path = diffusers_files["kohya"]
    info = loraswap.inspect(path)
    assert info.format == FORMAT_KOHYA
    assert info.components == ("unet",)
    tensors = load_file(path)
    _, network_alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    assert sorted(network_alphas.values()) == sorted(layer.alpha for layer in info.layers.values())
    for name, layer in info.layers.items():
        assert layer.alpha == float(tensors[f"{name}.alpha"])
        assert layer.scaling == layer.alpha / layer.rank
        assert layer.rank == tensors[f"{name}.lora_down.weight"].shape[0]
    assert info.layers[diffusers_files["first_alpha"][: -len(".alpha")]].alpha == 2.0


def _write_sparse_safetensors(path, tensors: dict[str, tuple[str, list[int]]], itemsize: int = 4) -> int:
    """A valid safetensors file whose data region is a hole: it declares every byte, stores almost none."""
    header, offset = {}, 0
    for key, (dtype, shape) in tensors.items():
        size = itemsize
        for dim in shape:
            size *= dim
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)
    return offset


def _bytes_read() -> int:
    with open("/proc/self/io") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("rchar"))


def test_multi_gigabyte_header_is_read_without_touching_data(tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    vocab = 1 << 22
    declared = _write_sparse_safetensors(
        tmp_path / "huge.safetensors",
        {
            "base_model.model.embed.lora_embedding_A": ("F32", [128, vocab]),
            "base_model.model.embed.lora_embedding_B": ("F32", [4096, 128]),
            "base_model.model.head.lora_A.weight": ("F32", [128, vocab]),
            "base_model.model.head.lora_B.weight": ("F32", [4096, 128]),
        },
    )
    assert declared > 4 << 30

    def refuse(*args, **kwargs):
        raise AssertionError("inspect must not load tensors")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "safe_open", refuse)
    before = _bytes_read()
    info = loraswap.inspect(tmp_path / "huge.safetensors")
    assert _bytes_read() - before < 1 << 20
    assert info.parameter_bytes == declared
    assert info.rank == 128
    assert info.layers["embed"].lora_A_shape == (128, vocab)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[: len(raw) - 100], "truncated"),
        (lambda raw: raw[:5], "too short"),
        (lambda raw: struct.pack("<Q", 10) + b"not json!!" + raw[18:], "not valid JSON"),
        (lambda raw: struct.pack("<Q", 1 << 40) + raw[8:], "truncated or not a safetensors file"),
    ],
)
def test_damaged_files_raise_format_error(llama_adapters, tmp_path, damage, message):
    raw = (llama_adapters["attn-r2"] / "adapter_model.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(raw))
    with pytest.raises(loraswap.AdapterFormatError, match=message):
        loraswap.inspect(bad)


def test_non_lora_and_pickled_files_are_refused(tmp_path, llama_adapters):
    save_file({"model.layers.0.weight": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    with pytest.raises(loraswap.AdapterFormatError, match="no LoRA tensors"):
        loraswap.inspect(tmp_path / "model.safetensors")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(llama_adapters["attn-r2"] / "adapter_config.json", pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    with pytest.raises(loraswap.PickleRefusedError, match="unpickles nothing"):
        loraswap.inspect(pickled)
    with pytest.raises(loraswap.AdapterNotFoundError):
        loraswap.inspect(tmp_path / "missing")


def test_dora_is_described_as_hot_swappable_dora(llama_base, tmp_path):
    path = write_peft_adapter(
        llama_base, tmp_path / "dora", r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True
    )
    info = loraswap.inspect(path)
    assert info.rank == 2 and info.has_dora and info.to_dict()["has_dora"]
    assert not info.unsupported
    assert all(layer.magnitude_shape == (64,) for layer in info.layers.values())


def test_to_dict_round_trips_through_json(llama_adapters):
    info = loraswap.inspect(llama_adapters["mlp-r32-rslora"])
    data = json.loads(json.dumps(info.to_dict()))
    assert data["rank"] == 32 and data["use_rslora"] is True
    assert data["layers"]["model.layers.0.mlp.up_proj"]["rank"] == 32
