"""kohya/LyCORIS DoRA (``dora_scale``, output axis ``(out, 1)``) in an SD1.5 file, UNet and CLIP text encoder:
served in slots mode against DoRA's formula merged by hand into an eager copy (the formula itself checked against
PEFT's DoRA layer on one layer), while diffusers 0.42.1 drops the scales; a squeezed 1-D scale on a square weight
is refused by name unless the header names the axis."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_unchanged, sd_latents, snapshot
from safetensors.torch import load_file, save_file

import loraswap
from loraswap import diffusers as lsd
from loraswap.testing.synthetic_diffusers import LoraSpec, tiny_sd_pipeline, write_kohya_lora

SPEC = LoraSpec(targets={"unet": ["to_q", "to_k", "to_out.0"], "text_encoder": ["q_proj", "fc1"]}, rank=4, alpha=2.0)


def with_dora_scales(path, target, squeeze=False, metadata=None):
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(7)
    for key in [key for key in tensors if key.endswith(".lora_up.weight")]:
        out = tensors[key].shape[0]
        scale = 0.5 + torch.rand(out, 1, generator=generator)
        tensors[key.replace(".lora_up.weight", ".dora_scale")] = scale.reshape(out) if squeeze else scale
    save_file(tensors, str(target), metadata=metadata)
    return target


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    directory = tmp_path_factory.mktemp("kohya-dora")
    pipe = tiny_sd_pipeline()
    plain = write_kohya_lora(pipe, directory / "plain.safetensors", SPEC)
    return pipe, plain, with_dora_scales(plain, directory / "dora.safetensors"), directory


def dora_merged(layer_weight, lora_A, lora_B, scaling, magnitude):
    """DoRA's weight, by hand: ``m / ||W + s*B*A||_row * (W + s*B*A)``."""
    updated = layer_weight + scaling * (lora_B @ lora_A)
    return magnitude[:, None] / torch.linalg.norm(updated, dim=1, keepdim=True) * updated


def merged_by_hand(pipe, path, dora: bool):
    """An eager copy of ``pipe`` with each layer of the file merged by hand (DoRA's formula, or ``W + s*B*A``)."""
    adapter = lsd.read_pipeline_adapter(pipe, str(path))
    reference = copy.deepcopy(pipe)
    with torch.no_grad():
        for component, part in adapter.components.items():
            for name, layer in part.layers.items():
                assert (layer.magnitude is not None) == dora
                module = getattr(reference, component).get_submodule(name)
                if dora:
                    merged = dora_merged(module.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.magnitude)
                else:
                    merged = module.weight + layer.scaling * (layer.lora_B @ layer.lora_A)
                module.weight.copy_(merged)
    return reference


def test_the_hand_formula_is_peft_dora_on_one_layer():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=3, target_modules=["0"], use_dora=True,
                                                           init_lora_weights=False))  # fmt: skip
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
        merged = dora_merged(base[0].weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight, 1.5,
                             layer.lora_magnitude_vector["default"].weight)  # fmt: skip
        x = torch.randn(3, 6)
        torch.testing.assert_close(model(x), torch.nn.functional.linear(x, merged, base[0].bias), atol=1e-6, rtol=0)


def test_kohya_output_axis_dora_matches_the_formula_and_diffusers_drops_it(case):
    pipe, plain, dora, _ = case
    expected = sd_latents(merged_by_hand(pipe, dora, dora=True))
    diffusers_pipe = copy.deepcopy(pipe)
    diffusers_pipe.load_lora_weights(str(dora))  # 0.42.1: deletes every dora_scale key, warns, loads plain LoRA
    plain_pipe = copy.deepcopy(pipe)
    plain_pipe.load_lora_weights(str(plain))
    assert torch.equal(sd_latents(diffusers_pipe), sd_latents(plain_pipe))
    assert not torch.allclose(sd_latents(diffusers_pipe), expected, atol=1e-4)

    attached = copy.deepcopy(pipe)
    pipeline_slots = lsd.attach(attached, [dora, plain], slots=2)
    pipeline_slots.load(dora, slot=0)
    pipeline_slots.load(plain, slot=1)
    pipeline_slots.activate(0)
    torch.testing.assert_close(sd_latents(attached), expected, atol=1e-5, rtol=0)
    pipeline_slots.activate(1)
    torch.testing.assert_close(sd_latents(attached), sd_latents(merged_by_hand(pipe, plain, dora=False)), atol=1e-5, rtol=0)


def test_squeezed_square_dora_scale_is_refused_unless_the_header_names_the_axis(case):
    pipe, plain, _, directory = case
    squeezed = with_dora_scales(plain, directory / "squeezed.safetensors", squeeze=True)
    attached = copy.deepcopy(pipe)
    pipeline_slots = lsd.attach(attached, [plain])
    before = {name: snapshot(getattr(attached, name)) for name in ("unet", "text_encoder")}
    with pytest.raises(loraswap.UnsupportedAdapterError, match="squeezed 1-D dora_scale on a square weight"):
        pipeline_slots.load(squeezed)
    for name, state in before.items():
        assert_unchanged(getattr(attached, name), state)
    named = with_dora_scales(plain, directory / "named.safetensors", squeeze=True, metadata={"wd_on_output": "True"})
    adapter = lsd.read_pipeline_adapter(pipe, str(named))
    assert all(layer.magnitude is not None for part in adapter.components.values() for layer in part.layers.values())


def test_kohya_flux_dora_scale_is_refused_by_name_not_loaded_as_plain_lora(tmp_path):
    """diffusers' kohya Flux converter rescales every module's tensors by alpha (new tensors), so no scale can be
    traced to its layer: refused by name, where diffusers would load the file as plain LoRA."""
    from loraswap.testing.synthetic_diffusers import tiny_flux_pipeline, write_kohya_flux_lora

    pipe = tiny_flux_pipeline()
    plain = write_kohya_flux_lora(pipe, tmp_path / "flux.safetensors")
    dora = with_dora_scales(plain, tmp_path / "flux-dora.safetensors")
    with pytest.raises(loraswap.UnsupportedAdapterError, match="dora_scale .* cannot be hot-swapped from this layout"):
        lsd.read_pipeline_adapter(pipe, str(dora))
