"""Invariant 6 (docs/design.md): every PEFT adapter loraswap cannot reproduce exactly is refused, naming the feature, and
``inspect`` says the same; the model is bit-identical afterwards. Files are PEFT's own output."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraswap
from conftest import assert_pipeline_unchanged, assert_unchanged, pipeline_snapshot, snapshot
from loraswap.errors import AdapterFormatError, CapacityError, PickleRefusedError, UnsupportedAdapterError

TARGETS = ["q_proj", "v_proj"]


def save_peft(base, path: Path, config, **save_kwargs) -> Path:
    """``get_peft_model(base, config).save_pretrained(path)`` with random non-zero adapter weights."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(str(path), **save_kwargs)
    return path


def with_config(source: Path, target: Path, **options) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **options}))
    return target


@pytest.fixture(scope="module")
def refused_files(llama_base, tmp_path_factory):
    """feature named in the refusal -> a PEFT adapter directory that has it."""
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

    directory = tmp_path_factory.mktemp("refused")
    lora = dict(r=2, lora_alpha=4, target_modules=TARGETS)
    files = {
        "IA3": save_peft(llama_base, directory / "ia3", IA3Config(target_modules=["v_proj", "down_proj"],
                                                                   feedforward_modules=["down_proj"])),
        "LoHa": save_peft(llama_base, directory / "loha", LoHaConfig(r=2, target_modules=TARGETS)),
        "LoKr": save_peft(llama_base, directory / "lokr", LoKrConfig(r=2, target_modules=TARGETS)),
        "modules_to_save": save_peft(llama_base, directory / "mts", LoraConfig(modules_to_save=["lm_head"], **lora)),
        "trained base biases": save_peft(llama_base, directory / "bias-all", LoraConfig(bias="all", **lora)),
        "trained embedding weights": save_peft(
            llama_base, directory / "embeddings", LoraConfig(**lora), save_embedding_layers=True
        ),
        "PiSSA": save_peft(llama_base, directory / "pissa", LoraConfig(init_lora_weights="pissa", **lora)),
    }
    files["trained base biases (lora_only)"] = save_peft(
        llama_base, directory / "bias-lora-only", LoraConfig(bias="lora_only", **lora)
    )
    plain = save_peft(llama_base, directory / "plain", LoraConfig(**lora))
    dora = save_peft(llama_base, directory / "dora", LoraConfig(use_dora=True, **lora))  # served (tests/test_dora.py)
    files["DoRA with lora_bias"] = with_config(dora, directory / "dora-bias", lora_bias=True)  # PEFT rejects it too
    for method, name in (("olora", "OLoRA"), ("corda", "CorDA"), ("pissa_niter_4", "PiSSA"), ("loftq", "LoftQ")):
        files[f"{name} ({method})"] = with_config(plain, directory / method, init_lora_weights=method)
    return files


@pytest.fixture(scope="module")
def served(llama_base, llama_adapters):
    model = copy.deepcopy(llama_base)
    slots = loraswap.attach(model, loraswap.Capacity(max_rank=16, target_modules=TARGETS + ["down_proj"], slots=2))
    slots.load(llama_adapters["attn-r2"])
    return model, slots


@pytest.mark.parametrize(
    "case",
    ["IA3", "LoHa", "LoKr", "DoRA with lora_bias", "modules_to_save", "trained base biases", "trained base biases (lora_only)",
     "trained embedding weights", "PiSSA", "OLoRA (olora)", "CorDA (corda)", "PiSSA (pissa_niter_4)", "LoftQ (loftq)"],
)  # fmt: skip
def test_each_feature_is_refused_by_name_and_inspect_agrees(served, refused_files, case):
    model, slots = served
    feature = case.split(" (")[0]
    before = snapshot(model)
    with pytest.raises(UnsupportedAdapterError, match=rf"{feature}.*cannot be hot-swapped: .+; ") as raised:
        slots.load(refused_files[case], slot=1)
    assert_unchanged(model, before)
    assert slots.loaded == {0: str(served[1].loaded[0])}
    try:
        info = loraswap.inspect(refused_files[case])
    except UnsupportedAdapterError as err:  # no LoRA layer at all (IA3, LoHa, LoKr): inspect refuses as the load does
        assert str(err) == str(raised.value)
    else:
        assert any(feature in reason for reason in info.unsupported), info.unsupported


def test_raw_pissa_names_the_conversion_and_the_converted_adapter_matches_the_trained_model(
    served, llama_base, llama_tokens, tmp_path
):
    """A PiSSA adapter as trained (on its residual base) is refused; converted as PEFT documents, it loads on the
    original base and gives exactly the trained PiSSA model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    trained = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=2, lora_alpha=2, init_lora_weights="pissa",
                                                                   target_modules=TARGETS))
    trained.save_pretrained(str(tmp_path / "initial"))  # before training, as PEFT's PiSSA example does
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)  # "training"
        expected = trained(llama_tokens).logits
    trained.save_pretrained(str(tmp_path / "raw"))
    initial = str(tmp_path / "initial")
    trained.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=initial)
    model, slots = served
    with pytest.raises(UnsupportedAdapterError, match="PiSSA.*path_initial_model_for_weight_conversion"):
        slots.load(tmp_path / "raw", slot=1)
    slots.load(tmp_path / "converted", slot=1)
    slots.activate(1)
    with torch.no_grad():
        torch.testing.assert_close(model(llama_tokens).logits, expected, atol=1e-5, rtol=0)
    slots.activate(0)


@pytest.fixture(scope="module")
def resized_vocab_adapter(llama_base, tmp_path_factory):
    """An embedding LoRA trained after resizing the vocabulary from 96 to 100 tokens (PEFT saves the resized base)."""
    from peft import LoraConfig

    resized = copy.deepcopy(llama_base)
    resized.resize_token_embeddings(100)
    path = save_peft(resized, tmp_path_factory.mktemp("vocab") / "resized",
                     LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    return path, resized


@pytest.mark.parametrize("mode", ["slots", "fused"])
def test_embedding_lora_with_a_resized_vocabulary_is_refused_naming_layer_and_rows(
    llama_base, resized_vocab_adapter, mode
):
    path, resized = resized_vocab_adapter
    torch.manual_seed(5)
    redrawn = copy.deepcopy(llama_base)
    redrawn.resize_token_embeddings(100)  # same size, new rows drawn afresh: not the rows the adapter was trained with
    cases = [(copy.deepcopy(llama_base), r"100 rows \[100, 64\], the model's has 96 rows"),
             (redrawn, r"4 of its 100 rows differ from the model's \(the first is row 96\)")]
    for model, rows in cases:
        capacity = loraswap.Capacity(max_rank=4, target_modules=["embed_tokens", "q_proj"])
        slots = loraswap.attach(model, capacity, mode=mode)
        before = snapshot(model)
        with pytest.raises(UnsupportedAdapterError, match=rf"layer 'model\.embed_tokens'.*resized vocabulary.*{rows}"):
            slots.load(path)
        assert_unchanged(model, before)
    same_base = copy.deepcopy(resized)  # the base the adapter was trained on: it loads
    capacity = loraswap.Capacity(max_rank=4, target_modules=["embed_tokens", "q_proj"])
    loraswap.attach(same_base, capacity, mode=mode).load(path)


def test_capacity_for_adapters_reads_pickles_only_when_allowed(llama_adapters, tmp_path):
    pickled = shutil.copytree(llama_adapters["attn-r2"], tmp_path / "pickled")
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with pytest.raises(PickleRefusedError, match="allow_pickle=True"):
        loraswap.Capacity.for_adapters([pickled])
    capacity = loraswap.Capacity.for_adapters([pickled], allow_pickle=True)
    assert capacity == loraswap.Capacity.for_adapters([llama_adapters["attn-r2"]])


def test_lone_file_with_a_residual_init_in_its_header_is_refused(llama_adapters, tmp_path):
    config = json.loads((llama_adapters["attn-r2"] / "adapter_config.json").read_text())
    lone = tmp_path / "olora.safetensors"
    save_file(load_file(llama_adapters["attn-r2"] / "adapter_model.safetensors"), lone,
              metadata={"lora_adapter_metadata": json.dumps({**config, "init_lora_weights": "olora"})})
    with pytest.raises(UnsupportedAdapterError, match="OLoRA.*path_initial_model_for_weight_conversion"):
        loraswap.load_adapter(lone)
    assert loraswap.inspect(lone).unsupported == ("a raw OLoRA adapter",)


# ---------------------------------------------------------------------------------------------------------------------
# Pipelines: the file's own keys are checked before diffusers' converters, which drop dora_scale silently (the
# input-axis DoRA convention is refused by name; the output axis is served, tests/test_dora_kohya.py)


def with_keys(source: Path, target: Path, transform) -> Path:
    save_file(transform(load_file(source)), target)
    return target


def kohya_modules(tensors):
    return [key[: -len(".lora_down.weight")] for key in tensors if key.endswith(".lora_down.weight")]


def add_dora_scale(tensors):
    """kohya/LyCORIS DoRA on the input axis (LyCORIS 2.2-3.1 dora_wd, OneTrainer): shape (1, in), refused by name
    (the output-axis convention is served: tests/test_dora_kohya.py)."""
    for module in kohya_modules(tensors):
        tensors[f"{module}.dora_scale"] = torch.ones(1, tensors[f"{module}.lora_down.weight"].shape[1])
    return tensors


def as_lycoris(kind: str):
    """The same layers as LyCORIS LoHa (two Hadamard-multiplied pairs) or LoKr (two Kronecker factors)."""

    def transform(tensors):
        out = {}
        for module in kohya_modules(tensors):
            down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
            pairs = {"hada_w1_a": up, "hada_w1_b": down, "hada_w2_a": up, "hada_w2_b": down} if kind == "loha" else {
                "lokr_w1": up[:2, :2], "lokr_w2": down}
            out.update({f"{module}.{name}": value.clone() for name, value in pairs.items()})
            out[f"{module}.alpha"] = tensors[f"{module}.alpha"]
        return out

    return transform


def bfl_control(tensors):
    """BFL's Flux Control layout: LoRA factors in BFL block names plus full norm scales."""
    return {
        "double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 32),
        "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(96, 4),
        "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16),
    }


def kohya_flux_linear1(tensors):
    """A kohya Flux single-block linear1 (fused qkv + MLP) on a transformer narrower than Flux's 3072."""
    tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"] = torch.randn(4, 32)
    tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"] = torch.randn(3 * 32 + 128, 4)
    tensors["lora_unet_single_blocks_0_linear1.alpha"] = torch.tensor(4.0)
    return tensors


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """An attached tiny SD and tiny Flux pipeline, each with a valid kohya LoRA loaded, and the refused files."""
    from loraswap import diffusers as lsd
    from loraswap.testing.synthetic_diffusers import (
        LoraSpec,
        tiny_flux_pipeline,
        tiny_sd_pipeline,
        write_kohya_flux_lora,
        write_kohya_lora,
    )

    directory = tmp_path_factory.mktemp("pipeline-refusals")
    sd, flux = tiny_sd_pipeline(), tiny_flux_pipeline()
    sd_lora = write_kohya_lora(sd, directory / "sd.safetensors",
                               LoraSpec(targets={"unet": ["to_q", "to_v"], "text_encoder": ["q_proj"]}))
    flux_lora = write_kohya_flux_lora(flux, directory / "flux.safetensors")
    attached = {"sd": (sd, lsd.attach(sd, [sd_lora])), "flux": (flux, lsd.attach(flux, [flux_lora]))}
    attached["sd"][1].load(sd_lora)
    attached["flux"][1].load(flux_lora)
    files = {
        "DoRA (kohya SD1.5)": ("sd", with_keys(sd_lora, directory / "sd-dora.safetensors", add_dora_scale)),
        "DoRA (kohya Flux)": ("flux", with_keys(flux_lora, directory / "flux-dora.safetensors", add_dora_scale)),
        "LyCORIS LoHa": ("sd", with_keys(sd_lora, directory / "loha.safetensors", as_lycoris("loha"))),
        "LyCORIS LoKr": ("sd", with_keys(sd_lora, directory / "lokr.safetensors", as_lycoris("lokr"))),
        "the BFL Flux Control LoRA layout": ("flux", with_keys(flux_lora, directory / "bfl.safetensors", bfl_control)),
    }
    linear1 = with_keys(flux_lora, directory / "flux-linear1.safetensors", kohya_flux_linear1)
    return attached, files, linear1


@pytest.mark.parametrize(
    "case",
    ["DoRA (kohya SD1.5)", "DoRA (kohya Flux)", "LyCORIS LoHa", "LyCORIS LoKr", "the BFL Flux Control LoRA layout"],
)
def test_pipeline_files_are_refused_by_name_before_diffusers_converts_them(pipelines, case):
    attached, files, _ = pipelines
    pipeline_name, path = files[case]
    pipe, pipeline_slots = attached[pipeline_name]
    feature = case.split(" (")[0]
    before, loaded = pipeline_snapshot(pipe), pipeline_slots.loaded
    expected = rf"^{re.escape(str(path))}: {re.escape(feature)}.* \(key .*cannot be hot-swapped"
    with pytest.raises(UnsupportedAdapterError, match=expected) as raised:
        pipeline_slots.load(path)
    assert_pipeline_unchanged(pipe, before)
    assert pipeline_slots.loaded == loaded
    try:
        info = loraswap.inspect(path)
    except UnsupportedAdapterError as err:
        assert str(err) == str(raised.value)
    else:
        assert any(feature in reason for reason in info.unsupported), info.unsupported


def test_a_converter_assertion_arrives_as_a_format_error_naming_the_file(pipelines):
    attached, _, linear1 = pipelines
    pipe, pipeline_slots = attached["flux"]
    before = pipeline_snapshot(pipe)
    expected = rf"^{re.escape(str(linear1))}: diffusers' converter rejected .*AssertionError"
    with pytest.raises(AdapterFormatError, match=expected):
        pipeline_slots.load(linear1)
    assert_pipeline_unchanged(pipe, before)


def test_enable_lora_hotswap_rank_errors_name_target_rank(tmp_path):
    """Over target_rank at the first load (which sizes the capacity) and at a later hotswap, the error speaks of
    target_rank, the drop-in's word, not of Capacity.max_rank."""
    from loraswap import diffusers as lsd
    from loraswap.testing.synthetic_diffusers import LoraSpec, tiny_sd_pipeline, write_kohya_lora

    pipe = tiny_sd_pipeline()
    r2, r4 = (write_kohya_lora(pipe, tmp_path / f"r{rank}.safetensors", LoraSpec(targets={"unet": ["to_q"]}, rank=rank))
              for rank in (2, 4))  # fmt: skip
    lsd.enable_lora_hotswap(pipe, target_rank=2)
    expected = r"rank 4 .*target_rank=2.*target_rank=4"
    with pytest.raises(CapacityError, match=expected) as first:
        pipe.load_lora_weights(str(r4))
    pipe.load_lora_weights(str(r2), adapter_name="style")
    before = pipeline_snapshot(pipe)
    with pytest.raises(CapacityError, match=expected) as later:
        pipe.load_lora_weights(str(r4), adapter_name="style", hotswap=True)
    assert "Capacity.max_rank" not in str(first.value) + str(later.value)
    assert_pipeline_unchanged(pipe, before)
