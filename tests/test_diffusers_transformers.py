"""Model-level hotswap on diffusers' transformers (Flux, Flux2, Chroma, QwenImage, MotifVideo, NucleusMoEImage),
against diffusers' ordinary loading: diffusers' own hotswap mixin compiles these models on several shapes and
never compares their outputs after a swap, so this does. Tiny configs, the eager backend, zero recompiles."""

from __future__ import annotations

import pytest
import torch

import loraswap.diffusers as lsd
from loraswap.testing.synthetic_diffusers import TINY_TRANSFORMERS, tiny_transformer, tiny_transformer_inputs, write_model_lora

# The first LoRA: attention projections; the second: a higher rank, fewer attention layers, and the output projection
# (a layer the first did not target, which diffusers' hotswap refuses and loraswap's capacity holds).
FIRST = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
SECOND = dict(r=8, lora_alpha=4, target_modules=["to_q", "to_v", "proj_out"])


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("name", sorted(TINY_TRANSFORMERS))
def test_compiled_model_level_hotswap_matches_diffusers_loading(name, tmp_path):
    files = {
        label: write_model_lora(tiny_transformer(name), tmp_path, label, seed=seed, **options)
        for seed, (label, options) in enumerate({"first": FIRST, "second": SECOND}.items(), start=1)
    }
    inputs = tiny_transformer_inputs(name)
    reference = tiny_transformer(name)
    expected = {}
    for label, file in files.items():
        reference.load_lora_adapter(file, adapter_name=label, prefix=None)
        reference.set_adapters(label)
        expected[label] = forward(reference, inputs)
    assert not torch.allclose(expected["first"], expected["second"], atol=1e-3)

    model = tiny_transformer(name)
    lsd.enable_lora_hotswap(model, target_rank=8)
    model.load_lora_adapter(files["first"], adapter_name="adapter0", prefix=None)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(forward(compiled, inputs), expected["first"], atol=1e-4, rtol=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled.load_lora_adapter(files["second"], adapter_name="adapter0", hotswap=True, prefix=None)
        torch.testing.assert_close(forward(compiled, inputs), expected["second"], atol=1e-4, rtol=0)
