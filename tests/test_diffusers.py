"""loraswap.diffusers on tiny random-init pipelines: every component swapped, diffusers' own loader as reference.

Each LoRA file is written in the format a trainer writes (diffusers' ``save_lora_weights`` or kohya
key names); the reference is a fresh pipeline given the same file through diffusers' ordinary
``load_lora_weights``. Compiled components use dynamo's ``eager`` backend: recompilation is decided
by dynamo's guards, which do not depend on the backend, and inductor would spend minutes on a
2-core machine.
"""

from __future__ import annotations

import copy
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraswap
import loraswap.diffusers as lsd
from loraswap.testing.synthetic import peft_reference, write_peft_adapter
from loraswap.testing.synthetic_diffusers import (
    LoraSpec,
    expected_kohya_scalings,
    random_lora_layers,
    tiny_flux_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    write_diffusers_lora,
    write_kohya_flux_lora,
    write_kohya_lora,
    write_xlabs_flux_lora,
)


# Four LoRAs with different targets, ranks and alphas, text encoder included.
SD_LORAS = {
    "unet-only": LoraSpec(targets={"unet": ["to_v", "to_out.0"]}, rank=8, alpha=4, seed=1),
    "unet-and-te": LoraSpec(
        targets={"unet": ["to_k", "ff.net.0.proj"], "text_encoder": ["k_proj", "fc2"]}, rank=2, alpha=3, seed=2
    ),
    "kohya-te": LoraSpec(
        targets={"unet": ["attn1.to_q", "attn2.to_k", "ff.net.2", "proj_in"], "text_encoder": ["q_proj", "out_proj", "fc1"]},
        rank=4,
        alpha=8,
        rank_pattern={"proj_in": 2},
        alpha_pattern={"ff.net.2": 2.0},
        seed=3,
    ),
    "te-only": LoraSpec(
        targets={"text_encoder": ["v_proj", "fc1"]}, rank=6, alpha=6, rank_pattern={"fc1": 3}, alpha_pattern={"v_proj": 12}, seed=4
    ),
}
# Per-module alphas in both components, and a kohya text-encoder LoRA without out_proj, both of which
# diffusers 0.42 mis-reads (most common alpha for the text encoder; q_proj keys dropped).
KOHYA_ALPHAS = LoraSpec(
    targets={"unet": ["attn2.to_q", "to_out.0"], "text_encoder": ["q_proj", "fc1"]},
    rank=4,
    alpha=4,
    rank_pattern={"fc1": 2},
    alpha_pattern={"q_proj": 1.0, "fc1": 3.0, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": 16.0},
    seed=5,
)


def write(pipe, directory, name, spec):
    if name.startswith("kohya"):
        return write_kohya_lora(pipe, directory / f"{name}.safetensors", spec)
    return write_diffusers_lora(pipe, directory / name, spec)


def generate(pipe, prompt="a cat", **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=1, output_type="latent", height=16, width=16, **kwargs).images


def storage_snapshot(pipeline_slots):
    return {
        name: [t.clone() for t in slots.storage.tensors]
        for name, slots in pipeline_slots.components.items()
    }


def assert_same_storage(before, pipeline_slots, description):
    after = storage_snapshot(pipeline_slots)
    for name in before:
        assert all(torch.equal(a, b) for a, b in zip(before[name], after[name])), (description, name)


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sd_files(sd_pipe, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sd-loras")
    return {name: write(sd_pipe, directory, name, spec) for name, spec in SD_LORAS.items()}


@pytest.fixture(scope="module")
def base_output(sd_pipe):
    return generate(sd_pipe)


@pytest.fixture(scope="module")
def references(sd_pipe, sd_files):
    """diffusers' own eager pipeline with each file: the outputs loraswap must match."""
    outputs = {}
    for name, path in sd_files.items():
        reference = copy.deepcopy(sd_pipe)
        reference.load_lora_weights(str(path))
        outputs[name] = generate(reference)
    return outputs


@pytest.fixture(scope="module")
def compiled(sd_pipe, sd_files):
    """One pipeline, attached for all four LoRAs, unet and text encoder compiled in place once."""
    pipe = copy.deepcopy(sd_pipe)
    pipeline_slots = lsd.attach(pipe, list(sd_files.values()))
    torch._dynamo.reset()
    pipe.unet.compile(backend="eager")
    pipe.text_encoder.compile(backend="eager")
    generate(pipe)  # the one compilation of each component
    return pipe, pipeline_slots


def test_attach_plans_union_of_targets_per_component(sd_pipe, sd_files):
    pipe = copy.deepcopy(sd_pipe)
    pipeline_slots = lsd.attach(pipe, list(sd_files.values()))
    assert set(pipeline_slots.components) == {"unet", "text_encoder"}
    for component in ("unet", "text_encoder"):
        expected = set()
        for spec in SD_LORAS.values():
            expected |= set(random_lora_layers(getattr(sd_pipe, component), spec, component))
        assert set(pipeline_slots.components[component].layout.placements) == expected
    assert pipeline_slots.components["unet"].capacity.max_rank == 8
    assert pipeline_slots.components["text_encoder"].capacity.max_rank == 6
    per_layer = lsd.attach(copy.deepcopy(sd_pipe), list(sd_files.values()), per_layer_rank=True)
    placements = per_layer.components["text_encoder"].layout.placements
    assert placements["encoder.layers.0.mlp.fc1"].rank == 4  # kohya-te r4, te-only r3 there
    assert placements["encoder.layers.0.self_attn.v_proj"].rank == 6


def test_compiled_swaps_match_diffusers_without_recompiling(compiled, sd_files, references, base_output):
    pipe, pipeline_slots = compiled
    order = list(sd_files)
    random.Random(0).shuffle(order)
    order += order[:2]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in order:
            pipeline_slots.load(sd_files[name])
            torch.testing.assert_close(generate(pipe), references[name], atol=1e-4, rtol=0)
        pipeline_slots.unload(0)
        assert torch.equal(generate(pipe), base_output)


def test_directory_and_state_dict_sources_match_diffusers(compiled, sd_pipe, sd_files, references):
    """A directory is read like its file; a state dict has no header, so no LoraConfig: scaling 1 per
    layer, as diffusers reads it too."""
    pipe, pipeline_slots = compiled
    with loraswap.no_recompile():
        pipeline_slots.load(sd_files["unet-and-te"].parent)
        torch.testing.assert_close(generate(pipe), references["unet-and-te"], atol=1e-4, rtol=0)
    state_dict = load_file(str(sd_files["unet-and-te"]))
    reference = copy.deepcopy(sd_pipe)
    reference.load_lora_weights(state_dict)
    with loraswap.no_recompile():
        pipeline_slots.load(state_dict)
        torch.testing.assert_close(generate(pipe), generate(reference), atol=1e-4, rtol=0)


def test_hub_id_resolves_offline_from_the_local_cache(compiled, sd_files, references, tmp_path, monkeypatch):
    """A hub id goes through diffusers' own resolution (here: the offline HF cache), as load_lora_weights does."""
    import huggingface_hub.constants as hub_constants

    repo = tmp_path / "models--someone--sd-lora"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(sd_files["kohya-te"], snapshot / "pytorch_lora_weights.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    pipe, pipeline_slots = compiled
    with loraswap.no_recompile():
        for weight_name in ("pytorch_lora_weights.safetensors", None):  # None: diffusers picks the file, locally
            misses = pipeline_slots.cache.misses
            pipeline_slots.load("someone/sd-lora", weight_name=weight_name)
            torch.testing.assert_close(generate(pipe), references["kohya-te"], atol=1e-4, rtol=0)
            pipeline_slots.load(sd_files["unet-only"])
            pipeline_slots.load("someone/sd-lora", weight_name=weight_name)  # the second load comes from the cache
            assert pipeline_slots.cache.misses == misses + 1
            torch.testing.assert_close(generate(pipe), references["kohya-te"], atol=1e-4, rtol=0)
    with pytest.raises(loraswap.AdapterNotFoundError, match="not resolvable as a hub id"):
        pipeline_slots.load("someone/absent-lora", weight_name="pytorch_lora_weights.safetensors")


def test_peft_directory_goes_to_the_component_it_fits(sd_pipe, tmp_path):
    path = write_peft_adapter(sd_pipe.text_encoder, tmp_path / "te-peft", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pipe = copy.deepcopy(sd_pipe)
    pipeline_slots = lsd.attach(pipe, [path])
    assert set(pipeline_slots.components) == {"text_encoder"}
    pipeline_slots.load(path)
    tokens = torch.arange(2, 10)[None]
    with torch.no_grad():
        expected = peft_reference(sd_pipe.text_encoder, path)(tokens).last_hidden_state
        torch.testing.assert_close(pipe.text_encoder(tokens).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_prefetch_fills_the_cache(sd_pipe, sd_files, tmp_path):
    pipe = copy.deepcopy(sd_pipe)
    pipeline_slots = lsd.attach(pipe, list(sd_files.values()), cache_bytes=0)
    assert len(pipeline_slots.cache) == 0
    pipeline_slots.cache.max_bytes = 1 << 30
    pipeline_slots.prefetch(sd_files["kohya-te"]).result()
    assert len(pipeline_slots.cache) == 1


def test_kohya_per_module_alphas_are_exact(sd_pipe, tmp_path):
    path = write_kohya_lora(sd_pipe, tmp_path / "alphas.safetensors", KOHYA_ALPHAS)
    pipe = copy.deepcopy(sd_pipe)
    pipeline_slots = lsd.attach(pipe, [path])
    pipeline_slots.load(path)
    expected = expected_kohya_scalings(sd_pipe, KOHYA_ALPHAS)
    assert {scaling for scaling in expected.values()} == {1.0, 0.25, 1.5, 4.0}
    for (component, module_name), scaling in expected.items():
        layer = getattr(pipe, component).get_submodule(module_name)
        assert layer.scale[0].item() == scaling, (component, module_name)
    # The factors themselves land unchanged: the layer's delta is alpha / rank * B @ A, computed by hand.
    tensors = load_file(str(path))
    key = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    layer = pipe.text_encoder.get_submodule("encoder.layers.1.self_attn.q_proj")
    x = torch.randn(3, layer.base_layer.in_features)
    delta = tensors[f"{key}.alpha"] / 4 * x @ tensors[f"{key}.lora_down.weight"].T @ tensors[f"{key}.lora_up.weight"].T
    with torch.no_grad():
        torch.testing.assert_close(layer(x[None])[0] - layer.base_layer(x), delta, atol=1e-6, rtol=1e-5)


def failing_sources(sd_pipe, sd_files, directory):
    """(description, source) pairs that must raise HotswapError and change nothing."""
    data = sd_files["unet-and-te"].read_bytes()
    truncated = directory / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    too_big = write_diffusers_lora(
        sd_pipe, directory / "rank-16", LoraSpec(targets={"unet": ["to_v"], "text_encoder": ["fc1"]}, rank=16, seed=9)
    )
    # unet part valid, text-encoder part over capacity: nothing may be written, unet included
    te_over = write_diffusers_lora(
        sd_pipe,
        directory / "te-over",
        LoraSpec(targets={"unet": ["to_v"], "text_encoder": ["fc1"]}, rank=7, rank_pattern={"to_v": 2}, seed=10),
    )
    tensors = load_file(str(sd_files["unet-only"]))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    for role in ("lora_A", "lora_B"):
        tensors[key.replace("down_blocks.0", "down_blocks.7").replace("lora_A", role)] = tensors[
            key.replace("lora_A", role)
        ].clone()
    no_such_layer = directory / "no-such-layer.safetensors"
    save_file(tensors, str(no_such_layer))
    other_pipeline = {f"text_encoder_2.{k.split('.', 1)[1]}": v for k, v in load_file(str(sd_files["te-only"])).items()}
    return [
        ("truncated file", truncated),
        ("rank over capacity", too_big),
        ("text-encoder rank over capacity, unet part valid", te_over),
        ("a layer in no component", no_such_layer),
        ("a component the pipeline lacks", other_pipeline),
        ("missing file", directory / "nope.safetensors"),
    ]


def test_failed_loads_leave_the_pipeline_bit_identical(compiled, sd_pipe, sd_files, tmp_path):
    pipe, pipeline_slots = compiled
    pipeline_slots.load(sd_files["kohya-te"])
    before_output = generate(pipe)
    before = storage_snapshot(pipeline_slots)
    for description, source in failing_sources(sd_pipe, sd_files, tmp_path):
        with pytest.raises(loraswap.HotswapError):
            pipeline_slots.load(source)
        assert_same_storage(before, pipeline_slots, description)  # every slot buffer of every component, bit for bit
    assert torch.equal(generate(pipe), before_output)
    assert pipeline_slots.loaded == {0: str(sd_files["kohya-te"])}


def test_enable_lora_hotswap_drop_in(sd_pipe, sd_files, references, base_output):
    pipe = copy.deepcopy(sd_pipe)
    lsd.enable_lora_hotswap(pipe, target_rank=8)
    assert type(pipe).load_lora_weights is not pipe.load_lora_weights.__func__
    pipe.load_lora_weights(str(sd_files["unet-only"]))
    torch.testing.assert_close(generate(pipe), references["unet-only"], atol=1e-4, rtol=0)
    # diffusers refuses these: a text-encoder LoRA, other targets, a kohya file with per-module alphas
    for name in ("unet-and-te", "kohya-te", "te-only"):
        pipe.load_lora_weights(str(sd_files[name]), adapter_name="default_0", hotswap=True)
        torch.testing.assert_close(generate(pipe), references[name], atol=1e-4, rtol=0)
    too_big = {k: torch.cat([v] * 2, dim=0 if "lora_A" in k else 1) for k, v in load_file(str(sd_files["unet-only"])).items()}
    with pytest.raises(loraswap.CapacityError):
        pipe.load_lora_weights(too_big, adapter_name="default_0", hotswap=True)
    torch.testing.assert_close(generate(pipe), references["te-only"], atol=1e-4, rtol=0)  # still loaded
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), base_output)


def test_enable_lora_hotswap_names_and_blends(sd_pipe, sd_files, references, base_output):
    pipe = copy.deepcopy(sd_pipe)
    hotswap = lsd.enable_lora_hotswap(pipe, target_rank=8, adapters=list(sd_files.values()), slots=2)
    pipe.load_lora_weights(str(sd_files["unet-only"]), adapter_name="a")
    pipe.load_lora_weights(str(sd_files["te-only"]), adapter_name="b")
    assert pipe.get_list_adapters() == {"unet": ["a"], "text_encoder": ["b"]}
    assert hotswap.slots.loaded == {0: str(sd_files["unet-only"]), 1: str(sd_files["te-only"])}
    torch.testing.assert_close(generate(pipe), references["te-only"], atol=1e-4, rtol=0)
    pipe.set_adapters(["a"])
    torch.testing.assert_close(generate(pipe), references["unet-only"], atol=1e-4, rtol=0)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])  # a blend of both slots: the drop-in's max_blend
    reference = copy.deepcopy(sd_pipe)
    reference.load_lora_weights(str(sd_files["unet-only"]), adapter_name="a")
    reference.load_lora_weights(str(sd_files["te-only"]), adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    torch.testing.assert_close(generate(pipe), generate(reference), atol=1e-4, rtol=0)
    with pytest.raises(loraswap.SlotError):
        pipe.load_lora_weights(str(sd_files["kohya-te"]), adapter_name="c")
    pipe.delete_adapters("a")
    pipe.set_adapters(["b"], adapter_weights=0.0)
    assert torch.equal(generate(pipe), base_output)


def test_enable_lora_hotswap_fuse_lora_matches_diffusers(sd_pipe, sd_files, base_output):
    """The drop-in's fuse_lora merges into the unet and the text encoder (diffusers' default components), or the
    unet alone; unfuse_lora restores the weights bit for bit; a per-call scale while fused is refused."""
    reference = copy.deepcopy(sd_pipe)
    reference.load_lora_weights(str(sd_files["unet-and-te"]), adapter_name="a")
    reference.fuse_lora()
    expected = {"both": generate(reference)}
    reference.unfuse_lora()
    reference.fuse_lora(components=["unet"])
    expected["unet only"] = generate(reference)
    pipe = copy.deepcopy(sd_pipe)
    lsd.enable_lora_hotswap(pipe, target_rank=8)
    pipe.load_lora_weights(str(sd_files["unet-and-te"]), adapter_name="a")
    unfused = generate(pipe)
    pipe.fuse_lora()
    torch.testing.assert_close(generate(pipe), expected["both"], atol=1e-4, rtol=0)
    with pytest.raises(loraswap.ModeError, match="scale of 0.5"):
        generate(pipe, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(loraswap.ModeError, match="unfuse_lora"):
        pipe.load_lora_weights(str(sd_files["te-only"]), adapter_name="b")
    pipe.unfuse_lora()
    assert torch.equal(generate(pipe), unfused)
    pipe.fuse_lora(components=["unet"])  # the text encoder's part stays a routed LoRA
    torch.testing.assert_close(generate(pipe), expected["unet only"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="vae is not found"):
        pipe.unfuse_lora(components=["vae"])
    pipe.unfuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), base_output)


@pytest.mark.parametrize("mode", ["slots", "fused"])
def test_sdxl_kohya_te1_te2_match_diffusers(tmp_path, mode):
    pipe = tiny_sdxl_pipeline()
    spec = LoraSpec(
        targets={"unet": ["to_q", "proj_in"], "text_encoder": ["q_proj", "out_proj"], "text_encoder_2": ["k_proj", "out_proj", "fc2"]},
        rank=4,
        alpha=8,
        seed=7,
    )
    path = write_kohya_lora(pipe, tmp_path / "sdxl-kohya.safetensors", spec)
    reference = copy.deepcopy(pipe)
    reference.load_lora_weights(str(path))
    attached = copy.deepcopy(pipe)
    pipeline_slots = lsd.attach(attached, path, mode=mode)
    assert set(pipeline_slots.components) == {"unet", "text_encoder", "text_encoder_2"}
    pipeline_slots.load(path)
    expected, base = generate(reference), generate(pipe)
    assert (expected - base).abs().max() > 1e-3  # Euler's latents are ~1e-2 here: compare at that scale
    torch.testing.assert_close(generate(attached), expected, atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def flux():
    pipe = tiny_flux_pipeline()
    torch.manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 4),
        "encoder_hidden_states": torch.randn(1, 8, 32),
        "pooled_projections": torch.randn(1, 32),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "return_dict": False,
    }
    return pipe, inputs


def flux_forward(pipe, inputs):
    with torch.no_grad():
        return pipe.transformer(**inputs)[0], pipe.text_encoder(torch.arange(8)[None]).last_hidden_state


@pytest.mark.parametrize("mode", ["slots", "fused"])
def test_flux_diffusers_and_kohya_files_match_diffusers(flux, tmp_path, mode):
    pipe, inputs = flux
    specs = {
        "attn": LoraSpec(targets={"transformer": ["to_q", "to_v", "add_k_proj"]}, rank=4, alpha=8, seed=1),
        "mlp-and-te": LoraSpec(
            targets={"transformer": ["proj_mlp", "ff.net.2"], "text_encoder": ["q_proj", "out_proj"]}, rank=8, alpha=4, seed=2
        ),
    }
    files = {name: write_diffusers_lora(pipe, tmp_path / name, spec) for name, spec in specs.items()}
    files["kohya-flux"] = write_kohya_flux_lora(pipe, tmp_path / "kohya-flux.safetensors", seed=3)
    files["xlabs"] = write_xlabs_flux_lora(pipe, tmp_path / "xlabs.safetensors", seed=4)
    xlabs = loraswap.inspect(files["xlabs"])  # inspect reads what the load takes
    assert (xlabs.format, xlabs.components, xlabs.unsupported) == ("xlabs", ("transformer",), ())
    references = {}
    for name, path in files.items():
        reference = copy.deepcopy(pipe)
        reference.load_lora_weights(str(path))
        references[name] = flux_forward(reference, inputs)
    attached = copy.deepcopy(pipe)
    pipeline_slots = lsd.attach(attached, list(files.values()), mode=mode)
    assert set(pipeline_slots.components) == {"transformer", "text_encoder"}
    torch._dynamo.reset()
    attached.transformer.compile(backend="eager")
    flux_forward(attached, inputs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in ["attn", "kohya-flux", "mlp-and-te", "xlabs", "attn"]:
            pipeline_slots.load(files[name])
            for got, want in zip(flux_forward(attached, inputs), references[name]):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        pipeline_slots.unload(0)
        for got, want in zip(flux_forward(attached, inputs), flux_forward(pipe, inputs)):
            assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------------------
# Fused mode: the LoRA merged into the unet and text-encoder weights


def component_weights(pipe):
    return {
        (component, name): tensor.clone()
        for component in ("unet", "text_encoder")
        for name, tensor in getattr(pipe, component).state_dict().items()
    }


def assert_same_weights(before, pipe, description):
    after = component_weights(pipe)
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert not changed, (description, changed[:3])


@pytest.fixture(scope="module")
def compiled_fused(sd_pipe, sd_files):
    pipe = copy.deepcopy(sd_pipe)
    pipeline_slots = lsd.attach(pipe, list(sd_files.values()), mode="fused")
    torch._dynamo.reset()
    pipe.unet.compile(backend="eager")
    pipe.text_encoder.compile(backend="eager")
    generate(pipe)
    return pipe, pipeline_slots


def test_fused_pipeline_swaps_match_diffusers_and_unload_restores_the_weights(
    compiled_fused, sd_pipe, sd_files, references, base_output
):
    pipe, pipeline_slots = compiled_fused
    assert isinstance(pipeline_slots, lsd.FusedPipelineSlots)
    order = list(sd_files)
    random.Random(1).shuffle(order)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in order + order[:2]:
            pipeline_slots.load(sd_files[name])
            torch.testing.assert_close(generate(pipe), references[name], atol=1e-4, rtol=0)
        pipeline_slots.unload(0)
        assert torch.equal(generate(pipe), base_output)
    assert_same_weights(component_weights(sd_pipe), pipe, "after unload")
    with pytest.raises(loraswap.ModeError, match="fused mode"):
        pipeline_slots.route([0])
    with pytest.raises(loraswap.ModeError, match="fused mode"):
        pipeline_slots.blend({0: 1.0})
    with pytest.raises(loraswap.ModeError, match="scale of 0.5"):
        generate(pipe, cross_attention_kwargs={"scale": 0.5})


def test_fused_pipeline_failed_loads_leave_the_weights_bit_identical(compiled_fused, sd_pipe, sd_files, tmp_path):
    """Validation failures write nothing; a text-encoder merge that overflows float32 after the unet part
    was merged makes the unet merge back to the previous LoRA."""
    pipe, pipeline_slots = compiled_fused
    pipeline_slots.load(sd_files["kohya-te"])
    before_output = generate(pipe)
    before = component_weights(pipe)
    tensors = load_file(str(sd_files["unet-and-te"]))
    overflowing = {key: value * 1e20 if key.startswith("text_encoder.") else value for key, value in tensors.items()}
    save_file(overflowing, str(tmp_path / "overflow.safetensors"))
    sources = [*failing_sources(sd_pipe, sd_files, tmp_path), ("text-encoder merge overflows", tmp_path / "overflow.safetensors")]
    for description, source in sources:
        with pytest.raises(loraswap.HotswapError):
            pipeline_slots.load(source)
        assert_same_weights(before, pipe, description)
    assert torch.equal(generate(pipe), before_output)
    assert pipeline_slots.loaded == {0: str(sd_files["kohya-te"])}


def test_fused_pipeline_activate_that_overflows_restores_every_component(sd_pipe, sd_files, tmp_path):
    """A LoRA staged in another slot is only validated; activating it merges, and an overflow in the text
    encoder after the unet merged puts the previous slot back in both."""
    pipe = copy.deepcopy(sd_pipe)
    pipeline_slots = lsd.attach(pipe, list(sd_files.values()), slots=2, mode="fused")
    pipeline_slots.load(sd_files["kohya-te"], slot=0)
    before = component_weights(pipe)
    tensors = load_file(str(sd_files["unet-and-te"]))
    overflowing = {key: value * 1e20 if key.startswith("text_encoder.") else value for key, value in tensors.items()}
    save_file(overflowing, str(tmp_path / "overflow.safetensors"))
    pipeline_slots.load(tmp_path / "overflow.safetensors", slot=1)  # staged: nothing merged yet
    assert_same_weights(before, pipe, "staged")
    with pytest.raises(loraswap.NonFiniteError):
        pipeline_slots.activate(1)
    assert_same_weights(before, pipe, "failed activate")
    assert {name: component.active for name, component in pipeline_slots.components.items()} == {
        "unet": 0,
        "text_encoder": 0,
    }


PROMPT_LORAS = ["unet-and-te", "kohya-te"]  # both in the unet and the text encoder


@pytest.fixture(scope="module")
def prompt_latents(sd_pipe):
    """Starting latents for 3 prompts x 2 images, so that a one-prompt run can start from its own rows."""
    size = 16 // sd_pipe.vae_scale_factor
    return torch.randn(6, sd_pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def per_prompt_references(sd_pipe, sd_files, prompt_latents):
    """diffusers' ordinary loading, one prompt per run: (prompt, LoRA or None, scale) -> latents."""
    pipes = {None: sd_pipe}
    for name in PROMPT_LORAS:
        pipes[name] = copy.deepcopy(sd_pipe)
        pipes[name].load_lora_weights(str(sd_files[name]))

    def reference(index, prompt, lora, scale=None):
        options = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
        latents = prompt_latents[2 * index : 2 * index + 2]
        return generate(pipes[lora], [prompt], num_images_per_prompt=2, latents=latents, **options)

    return reference


def test_per_prompt_routing_covers_guidance_images_and_text_encoder(sd_pipe, sd_files, prompt_latents, per_prompt_references):
    """One LoRA per prompt, under classifier-free guidance and num_images_per_prompt=2, compiled, each
    prompt's latents equal to diffusers' single-prompt run with its LoRA; a per-call scale is a routing
    weight, changed between calls without recompiling."""
    pipe = copy.deepcopy(sd_pipe)
    pipeline_slots = lsd.attach(pipe, [sd_files[name] for name in PROMPT_LORAS], slots=2)
    for slot, name in enumerate(PROMPT_LORAS):
        pipeline_slots.load(sd_files[name], slot)
    torch._dynamo.reset()
    pipe.unet.compile(backend="eager")
    pipe.text_encoder.compile(backend="eager")
    prompts = ["a cat", "a dog", "a tree"]
    loras = [*PROMPT_LORAS, None]

    def run(scale=None):
        options = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
        return generate(pipe, prompts, num_images_per_prompt=2, latents=prompt_latents, **options)

    pipeline_slots.route([0, 1, -1])
    assert type(pipe).__name__ == "StableDiffusionPipeline" and isinstance(pipe, type(sd_pipe))
    batched = run(scale=0.5)  # the one compilation of each component
    with torch._dynamo.config.patch(error_on_recompile=True):
        for scale in (0.5, None):
            if scale is None:
                batched = run()
            for index, (prompt, lora) in enumerate(zip(prompts, loras)):
                expected = per_prompt_references(index, prompt, lora, scale)
                torch.testing.assert_close(batched[2 * index : 2 * index + 2], expected, atol=1e-4, rtol=0)
        pipeline_slots.blend([{1: 1.0}, {}, {0: 1.0}])
        batched = run(scale=0.8)
    torch.testing.assert_close(batched[:2], per_prompt_references(0, prompts[0], "kohya-te", 0.8), atol=1e-4, rtol=0)
    with pytest.raises(loraswap.SlotError, match="3 entries but the pipeline call has 1 prompt"):
        generate(pipe, "a cat")


@pytest.mark.parametrize("verb", ["activate", "route", "blend", "unload"])
def test_pipeline_verbs_after_one_component_was_cast_raise_before_any_component_changes(sd_pipe, sd_files, verb):
    pipe = copy.deepcopy(sd_pipe)
    pipeline_slots = lsd.attach(pipe, [sd_files["unet-and-te"]], slots=2, cache_bytes=0)
    pipeline_slots.load(sd_files["unet-and-te"], slot=1)
    pipe.text_encoder.double()  # the unet, first in the components, is not cast
    unet = pipeline_slots.components["unet"]
    before = {name: t.clone() for name, t in unet.model.named_buffers()}
    verbs = {
        "activate": lambda: pipeline_slots.activate(1),
        "route": lambda: pipeline_slots.route([1, 0]),
        "blend": lambda: pipeline_slots.blend({1: 0.5}),
        "unload": lambda: pipeline_slots.unload(1),
    }
    with pytest.raises(loraswap.LayoutChangedError, match="moved or cast"):
        verbs[verb]()
    assert all(torch.equal(t, before[name]) for name, t in unet.model.named_buffers())


def test_pool_over_pipeline_slots_routes_one_lora_per_prompt(sd_pipe, sd_files, prompt_latents, per_prompt_references):
    """AdapterPool over PipelineSlots: a row is a prompt; one LoRA (or a strength) per prompt under guidance and
    num_images_per_prompt=2 equals diffusers' single-prompt run with that LoRA (at that scale). Four LoRAs over
    two slots: the call between the checked ones evicts both, which come back from the host cache; no
    recompilation after the first call."""
    pipe = copy.deepcopy(sd_pipe)
    pipeline_slots = lsd.attach(pipe, list(sd_files.values()), slots=2)
    pool = loraswap.AdapterPool(pipeline_slots, resolve=lambda name: sd_files[name])
    torch._dynamo.reset()
    pipe.unet.compile(backend="eager")
    pipe.text_encoder.compile(backend="eager")
    prompts = ["a cat", "a dog", "a tree"]

    def run(rows):
        with pool.route(rows):
            return generate(pipe, prompts, num_images_per_prompt=2, latents=prompt_latents)

    def check(rows, batched):
        for index, (prompt, row) in enumerate(zip(prompts, rows)):
            lora, scale = next(iter(row.items())) if isinstance(row, dict) else (row, None)
            expected = per_prompt_references(index, prompt, lora, scale)
            torch.testing.assert_close(batched[2 * index : 2 * index + 2], expected, atol=1e-4, rtol=0)

    first = ["unet-and-te", "kohya-te", None]
    check(first, run(first))  # the one compilation of each component
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(["unet-only", None, "te-only"])
        rows = [{"kohya-te": 0.5}, None, "unet-and-te"]
        check(rows, run(rows))
    assert pool.stats["evictions"] == 4 and pool.stats["host_hits"] >= 2, pool.stats
