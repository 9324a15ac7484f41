"""Quantized bases (the FP8 + compile deployment): slots mode is exact, fused mode refuses.

Slots mode leaves the base layer's forward alone and adds the LoRA in the slot buffers' dtype, as PEFT
does, so it matches PEFT's LoRA on the same quantized base, quantized before or after ``attach``, under
``torch.compile`` (``aot_eager``: dynamo and AOT autograd desugar torchao's tensor subclasses as
inductor would; the inductor backend is not what is tested). Fused mode would have to merge into a
quantized weight, which re-quantizes or silently writes nothing: ``attach(mode="fused")`` refuses.
"""

from __future__ import annotations

import copy

import pytest
import torch

import loraswap
from loraswap.errors import ModeError
from loraswap.testing.synthetic import peft_reference

ADAPTERS = ("attn-r2", "mlp-r32-rslora")


def torchao_int8(model):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())


def torchao_float8(model):
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    quantize_(model, Float8WeightOnlyConfig())


def quanto_frozen(model):
    from optimum.quanto import freeze, qint8, quantize

    quantize(model, weights=qint8)
    freeze(model)


def quanto_dynamic(model):
    from optimum.quanto import qint8, quantize

    quantize(model, weights=qint8)


TORCHAO = {"torchao int8": (torchao_int8, "Int8Tensor"), "torchao float8": (torchao_float8, "Float8Tensor")}
REFUSED = {
    **TORCHAO,
    "quanto frozen": (quanto_frozen, "WeightQBytesTensor"),
    "quanto dynamic": (quanto_dynamic, "QLinear quantizes it to qint8 at each forward"),
}


@pytest.mark.parametrize("quantization", REFUSED)
def test_fused_mode_refuses_a_quantized_weight(llama_base, llama_adapters, llama_tokens, quantization):
    quantize, weight_type = REFUSED[quantization]
    model = copy.deepcopy(llama_base)
    quantize(model)
    with torch.no_grad():
        logits_before = model(llama_tokens).logits
    weights_before = {name: module.weight for name, module in model.named_modules() if hasattr(module, "weight")}
    capacity = loraswap.Capacity.for_adapters([llama_adapters["attn-r2"]], model=model)
    with pytest.raises(ModeError, match=rf"q_proj.*weight is quantized .*{weight_type}.*mode='slots'"):
        loraswap.attach(model, capacity, mode="fused")
    assert not loraswap.fused.is_fused(model)
    weights_after = {name: module.weight for name, module in model.named_modules() if hasattr(module, "weight")}
    assert weights_after == weights_before
    with torch.no_grad():
        assert torch.equal(model(llama_tokens).logits, logits_before)


@pytest.fixture(scope="module")
def peft_on_quantized(llama_base, llama_adapters, llama_tokens):
    """PEFT's eager output of each adapter on each torchao-quantized base: the references."""
    outputs = {}
    for quantization, (quantize, _) in TORCHAO.items():
        quantized = copy.deepcopy(llama_base)
        quantize(quantized)
        with torch.no_grad():
            for name in ADAPTERS:
                outputs[quantization, name] = peft_reference(quantized, llama_adapters[name])(llama_tokens).logits
    return outputs


@pytest.mark.parametrize("order", ["quantized before attach", "quantized after attach"])
@pytest.mark.parametrize("quantization", TORCHAO)
def test_slots_mode_on_torchao_weights_matches_peft_compiled(
    llama_base, llama_adapters, llama_tokens, peft_on_quantized, quantization, order
):
    quantize, weight_type = TORCHAO[quantization]
    paths = [llama_adapters[name] for name in ADAPTERS]
    model = copy.deepcopy(llama_base)
    if order == "quantized before attach":
        quantize(model)
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters(paths, model=model, slots=2), cache_bytes=0)
    if order == "quantized after attach":
        quantize(model)
    assert type(model.model.layers[0].self_attn.q_proj.base_layer.weight).__name__ == weight_type
    for slot, path in enumerate(paths):
        slots.load(path, slot=slot)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    expected = [peft_on_quantized[quantization, name] for name in ADAPTERS]
    with torch.no_grad():
        compiled(llama_tokens)
        with loraswap.no_recompile():
            for slot in (0, 1):
                slots.activate(slot)
                torch.testing.assert_close(compiled(llama_tokens).logits, expected[slot], atol=1e-6, rtol=0)
            slots.route([1, 0, -1])
            routed = compiled(llama_tokens).logits
            slots.unload(0)
            slots.activate(0)
            base = compiled(llama_tokens).logits  # an empty slot: the quantized base model
    torch.testing.assert_close(routed[0], expected[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(routed[1], expected[0][1], atol=1e-6, rtol=0)
    torch.testing.assert_close(routed[2], base[2], atol=0, rtol=0)


@pytest.mark.parametrize("quantization", ["torchao int8", "quanto frozen"])
def test_fused_mode_refuses_to_merge_after_the_model_was_quantized(
    llama_base, llama_adapters, llama_tokens, quantization
):
    quantize, _ = REFUSED[quantization]
    model = copy.deepcopy(llama_base)
    fused = loraswap.attach(
        model, loraswap.Capacity.for_adapters([llama_adapters["attn-r2"]], model=model), mode="fused", cache_bytes=0
    )
    quantize(model)
    with torch.no_grad():
        logits_before = model(llama_tokens).logits
    with pytest.raises(loraswap.LayoutChangedError, match="q_proj.*moved, cast or quantized"):
        fused.load(llama_adapters["attn-r2"])
    with torch.no_grad():
        assert torch.equal(model(llama_tokens).logits, logits_before)
