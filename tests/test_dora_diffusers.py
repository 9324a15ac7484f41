"""PEFT-format DoRA in a diffusers pipeline file (``lora_magnitude_vector`` keys, ``use_dora`` in the header's
LoraConfig), on the UNet and the CLIP text encoder: ``loraswap.diffusers.attach`` and the ``enable_lora_hotswap``
drop-in against PEFT's own DoRA layers injected into an eager copy of each component."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import sd_latents
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraswap import diffusers as lsd
from loraswap.testing.synthetic_diffusers import LoraSpec, tiny_sd_pipeline, write_diffusers_lora

SPEC = LoraSpec(targets={"unet": ["to_q", "to_v"], "text_encoder": ["q_proj", "v_proj"]}, rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    pipe = tiny_sd_pipeline()
    plain = write_diffusers_lora(pipe, tmp_path_factory.mktemp("dora-sd"), SPEC)
    with safe_open(str(plain), "pt") as handle:
        metadata = dict(handle.metadata())
    config = json.loads(metadata["lora_adapter_metadata"])
    config.update({"unet.use_dora": True, "text_encoder.use_dora": True})
    tensors = load_file(str(plain))
    generator = torch.Generator().manual_seed(3)
    for key in list(tensors):
        if key.endswith(".lora_B.weight"):
            out = tensors[key].shape[0]
            tensors[key.replace(".lora_B.weight", ".lora_magnitude_vector")] = 0.5 + torch.rand(out, generator=generator)
    path = plain.parent / "dora.safetensors"
    save_file(tensors, str(path), metadata={**metadata, "lora_adapter_metadata": json.dumps(config)})
    return pipe, path, plain


def peft_reference(pipe, path):
    """PEFT's DoRA layers injected into a copy of each component, with the file's tensors: the reference."""
    from peft import LoraConfig, inject_adapter_in_model

    reference = copy.deepcopy(pipe)
    adapter = lsd.read_pipeline_adapter(pipe, str(path))
    for name, part in adapter.components.items():
        component = getattr(reference, name)
        config = LoraConfig(r=SPEC.rank, lora_alpha=SPEC.alpha, target_modules=sorted(part.layers), use_dora=True)
        inject_adapter_in_model(config, component)
        with torch.no_grad():
            for module_name, layer in part.layers.items():
                module = component.get_submodule(module_name)
                module.lora_A["default"].weight.copy_(layer.lora_A)
                module.lora_B["default"].weight.copy_(layer.lora_B)
                module.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return reference.to(torch.float32)


def test_pipeline_dora_matches_peft_in_slots_and_the_drop_in(case):
    pipe, path, plain = case
    expected = sd_latents(peft_reference(pipe, path))
    plain_reference = copy.deepcopy(pipe)
    plain_reference.load_lora_weights(str(plain))
    assert not torch.allclose(expected, sd_latents(plain_reference), atol=1e-4)  # DoRA is not its plain factors

    attached = copy.deepcopy(pipe)
    pipeline_slots = lsd.attach(attached, [path])
    assert pipeline_slots.components["unet"].capacity.dora and pipeline_slots.components["text_encoder"].capacity.dora
    pipeline_slots.load(path)
    torch.testing.assert_close(sd_latents(attached), expected, atol=1e-5, rtol=0)

    dropin = copy.deepcopy(pipe)
    lsd.enable_lora_hotswap(dropin, target_rank=8)
    dropin.load_lora_weights(str(path))
    torch.testing.assert_close(sd_latents(dropin), expected, atol=1e-5, rtol=0)
    dropin.unload_lora_weights()
    torch.testing.assert_close(sd_latents(dropin), sd_latents(pipe), atol=0, rtol=0)
