"""The model-level drop-in against diffusers' own loading: a UNet2DConditionModel with LoRAs written by
diffusers' ``save_lora_adapter``, swapped, weighted and disabled after ``torch.compile`` without recompiling,
and the CI subset of diffusers' own hotswap tests run through ``scripts/diffusers_hotswap_suite.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loraswap
import loraswap.diffusers as lsd
from loraswap.testing.synthetic_diffusers import tiny_unet, write_model_lora

# Layers of the first LoRA (a conv among them) and others the second adds; ranks differ, the third is too big.
MODEL_LORAS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["to_q", "conv1"]),
    "b": dict(r=8, lora_alpha=4, target_modules=["to_v", "to_out.0", "ff.net.2"]),
    "too-big": dict(r=16, lora_alpha=16, target_modules=["to_q"]),
    "bias-on-to-q": dict(r=4, lora_alpha=4, target_modules=["to_q"], lora_bias=True),  # to_q has no bias to merge into
}
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model-loras")
    return {
        name: write_model_lora(tiny_unet(), directory, name, seed=seed, **options)
        for seed, (name, options) in enumerate(MODEL_LORAS.items())
    }


@pytest.fixture(scope="module")
def unet_inputs():
    generator = torch.Generator().manual_seed(0)
    return dict(
        sample=torch.randn(2, 4, 8, 8, generator=generator),
        timestep=torch.tensor([3, 7]),
        encoder_hidden_states=torch.randn(2, 5, 32, generator=generator),
    )


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.fixture(scope="module")
def diffusers_outputs(model_files, unet_inputs):
    """diffusers' own eager loading: each LoRA alone, and set_adapters(["a", "b"], [0.7, 0.4])."""
    model = tiny_unet()
    outputs = {"base": forward(model, unet_inputs)}
    for name in ("a", "b"):
        model.load_lora_adapter(model_files[name], adapter_name=name, prefix=None)
        model.set_adapters(name)
        outputs[name] = forward(model, unet_inputs)
    model.set_adapters(["a", "b"], [0.7, 0.4])
    outputs["mix"] = forward(model, unet_inputs)
    return outputs


def test_model_level_swaps_weights_and_disable_after_compile_match_diffusers(model_files, unet_inputs, diffusers_outputs):
    model = tiny_unet()
    lsd.patch()
    try:
        model.enable_lora_hotswap(target_rank=8, slots=2)  # diffusers' own method, routed by patch()
    finally:
        lsd.unpatch()
    model.load_lora_adapter(model_files["a"], adapter_name="a", prefix=None)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(forward(compiled, unet_inputs), diffusers_outputs["a"], atol=1e-4, rtol=0)

    def check(expected):
        torch.testing.assert_close(forward(compiled, unet_inputs), diffusers_outputs[expected], atol=1e-4, rtol=0)

    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled.load_lora_adapter(model_files["b"], adapter_name="b", prefix=None)  # more layers than "a"
        check("b")
        compiled.set_adapters(["a", "b"], [0.7, 0.4])
        check("mix")
        assert compiled.active_adapters() == ["a", "b"]
        compiled.disable_lora()
        check("base")
        compiled.enable_lora()
        check("mix")
        compiled.load_lora_adapter(model_files["b"], adapter_name="a", hotswap=True, prefix=None)
        compiled.set_adapters("a")
        check("b")
        compiled.delete_adapters("a")
        check("base")
    with pytest.raises(ValueError, match="no existing adapter by that name"):
        compiled.load_lora_adapter(model_files["a"], adapter_name="does-not-exist", hotswap=True, prefix=None)
    with pytest.raises(ValueError, match="rank 16 exceeds"):
        compiled.load_lora_adapter(model_files["too-big"], adapter_name="b", hotswap=True, prefix=None)
    with pytest.raises(ValueError, match="already in use"):
        compiled.load_lora_adapter(model_files["a"], adapter_name="b", prefix=None)


def test_enable_after_a_diffusers_load_raises_or_takes_the_adapter_over(model_files, unet_inputs, diffusers_outputs):
    model = tiny_unet()
    model.load_lora_adapter(model_files["b"], adapter_name="b", prefix=None)
    with pytest.raises(RuntimeError, match="before loading the first adapter"):
        lsd.enable_lora_hotswap(model, target_rank=8)
    with pytest.raises(ValueError, match="check_compiles should be one of"):
        lsd.enable_lora_hotswap(model, target_rank=8, check_compiled="wrong-argument")
    lsd.enable_lora_hotswap(model, target_rank=8, check_compiled="ignore")
    assert not any(hasattr(module, "lora_A") and hasattr(module, "base_layer") and not hasattr(module, "row_weights")
                   for module in model.modules())  # fmt: skip
    assert model.active_adapters() == ["b"]
    torch.testing.assert_close(forward(model, unet_inputs), diffusers_outputs["b"], atol=1e-4, rtol=0)


def test_diffusers_own_enable_lora_hotswap_tests_pass_with_loraswap():
    """The CI subset of diffusers' own hotswap tests, run with diffusers and with loraswap (the script's
    whole set, compiled swaps included, is run by hand: see the README)."""
    completed = subprocess.run(
        [sys.executable, str(REPOSITORY / "scripts" / "diffusers_hotswap_suite.py"), "--subset", "ci"],
        capture_output=True, text=True, check=False, cwd=REPOSITORY,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr[-4000:]
    assert "passed   8" in completed.stdout, completed.stdout


def scaled(inputs, scale):
    return {**inputs, "cross_attention_kwargs": {"scale": scale}}


def test_per_call_scale_on_an_in_place_compiled_model_matches_diffusers(model_files, unet_inputs, diffusers_outputs):
    """``model(..., cross_attention_kwargs={"scale": s})`` after ``model.compile()``: the scale is a routing weight
    taken out before the compiled forward, so each strength equals diffusers' eager result and none recompiles
    (``torch.compile(model)`` is covered by the fuse test below)."""
    reference = tiny_unet()
    reference.load_lora_adapter(model_files["a"], adapter_name="a", prefix=None)
    expected = {scale: forward(reference, scaled(unet_inputs, scale)) for scale in (0.5, 0.8)}
    model = tiny_unet()
    lsd.enable_lora_hotswap(model, target_rank=8)
    model.load_lora_adapter(model_files["a"], adapter_name="a", prefix=None)
    torch._dynamo.reset()
    model.compile(backend="eager")
    forward(model, unet_inputs)  # the one compilation
    with torch._dynamo.config.patch(error_on_recompile=True):
        for scale in (0.5, 0.8, 0.5):
            torch.testing.assert_close(forward(model, scaled(unet_inputs, scale)), expected[scale], atol=1e-4, rtol=0)
        torch.testing.assert_close(forward(model, unet_inputs), diffusers_outputs["a"], atol=1e-4, rtol=0)
    assert (expected[0.5] - diffusers_outputs["a"]).abs().max() > 1e-3


def test_per_call_scale_fuse_lora_and_unfuse_lora_match_diffusers_without_recompiling(
    model_files, unet_inputs, diffusers_outputs
):
    """On ``torch.compile(model)``: a per-call scale on a blend of two adapters; fuse_lora merging the blend (and,
    at lora_scale=0.5, one adapter) into the base weights as diffusers does; unfuse_lora restoring them bit for bit;
    unload_lora keeping fused weights, as in diffusers."""
    reference = tiny_unet()
    for name in ("a", "b"):
        reference.load_lora_adapter(model_files[name], adapter_name=name, prefix=None)
    reference.set_adapters(["a", "b"], [0.7, 0.4])
    expected = {"mix at 0.5": forward(reference, scaled(unet_inputs, 0.5))}
    reference.fuse_lora()
    expected["fused mix"] = forward(reference, unet_inputs)
    reference.unfuse_lora()
    expected["unfused"] = forward(reference, unet_inputs)
    reference.set_adapters("b")
    reference.fuse_lora(lora_scale=0.5)
    expected["fused b at 0.5"] = forward(reference, unet_inputs)
    reference.unload_lora()
    expected["unloaded after fuse"] = forward(reference, unet_inputs)

    model = tiny_unet()
    lsd.enable_lora_hotswap(model, target_rank=8, slots=2)
    for name in ("a", "b"):
        model.load_lora_adapter(model_files[name], adapter_name=name, prefix=None)
    model.set_adapters(["a", "b"], [0.7, 0.4])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    before = forward(compiled, unet_inputs)  # the one compilation

    def check(name):
        torch.testing.assert_close(forward(compiled, unet_inputs), expected[name], atol=1e-4, rtol=0)

    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(forward(compiled, scaled(unet_inputs, 0.5)), expected["mix at 0.5"], atol=1e-4, rtol=0)
        compiled.fuse_lora()
        check("fused mix")
        with pytest.raises(loraswap.ModeError, match="unfuse_lora"):
            compiled.set_adapters("a")
        with pytest.raises(loraswap.ModeError, match="scale of 0.5"):
            forward(compiled, scaled(unet_inputs, 0.5))
        compiled.unfuse_lora()
        check("unfused")
        assert torch.equal(forward(compiled, unet_inputs), before)  # the base weights back bit for bit
        compiled.set_adapters("b")
        compiled.fuse_lora(lora_scale=0.5)
        check("fused b at 0.5")
        compiled.unload_lora()
        check("unloaded after fuse")
    torch.testing.assert_close(expected["unfused"], diffusers_outputs["mix"], atol=1e-4, rtol=0)


def test_fuse_lora_refuses_a_merge_that_is_not_exact(model_files, unet_inputs):
    """A LoRA bias on a layer without a bias cannot be merged: ModeError names the layer, nothing changes."""
    model = tiny_unet()
    lsd.enable_lora_hotswap(model, target_rank=8)
    model.load_lora_adapter(model_files["bias-on-to-q"], adapter_name="bias", prefix=None)
    before = forward(model, unet_inputs)
    with pytest.raises(loraswap.ModeError, match="to_q.base_layer.*no bias"):
        model.fuse_lora()
    assert torch.equal(forward(model, unet_inputs), before)
    model.set_adapters("bias")  # not fused: the verbs still work
    with pytest.raises(loraswap.ModeError, match="nothing is fused"):
        model.unfuse_lora()
