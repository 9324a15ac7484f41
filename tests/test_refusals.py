"""Invariant 6: every PEFT adapter loraswap cannot reproduce exactly is refused, naming the feature, and
``inspect`` says the same; the model is bit-identical afterwards. Files are PEFT's own output."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraswap
from conftest import assert_unchanged, snapshot
from loraswap.errors import PickleRefusedError, UnsupportedAdapterError

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
        "DoRA": save_peft(llama_base, directory / "dora", LoraConfig(use_dora=True, **lora)),
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
    ["IA3", "LoHa", "LoKr", "DoRA", "modules_to_save", "trained base biases", "trained base biases (lora_only)",
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
    trained.save_pretrained(str(tmp_path / "initial"))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)  # "training"
        expected = trained(llama_tokens).logits
    trained.save_pretrained(str(tmp_path / "raw"))
    trained.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
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
def test_embedding_lora_with_a_resized_vocabulary_is_refused_naming_layer_and_rows(llama_base, resized_vocab_adapter, mode):
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
    loraswap.attach(same_base, loraswap.Capacity(max_rank=4, target_modules=["embed_tokens", "q_proj"]), mode=mode).load(path)


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
