"""Property tests: random ranks, targets and alphas always match PEFT after a swap, in any order."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loraswap
from loraswap.synthetic import LLAMA_PROJECTIONS, peft_reference, write_peft_adapter

adapter_specs = st.fixed_dictionaries(
    {
        "r": st.integers(1, 12),
        "lora_alpha": st.sampled_from([1, 2, 3.5, 8, 16]),
        "target_modules": st.lists(st.sampled_from(LLAMA_PROJECTIONS), min_size=1, max_size=4, unique=True),
        "use_rslora": st.booleans(),
    }
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(adapter_specs, min_size=2, max_size=3), slots=st.integers(1, 2))
def test_random_adapters_match_peft_after_swaps(llama_base, llama_tokens, specs, slots):
    with tempfile.TemporaryDirectory() as directory:
        paths = [write_peft_adapter(llama_base, Path(directory) / str(i), seed=i, **spec) for i, spec in enumerate(specs)]
        model = copy.deepcopy(llama_base)
        handle = loraswap.attach(model, loraswap.Capacity.for_adapters(paths, model=model, slots=slots))
        with torch.no_grad():
            for index, path in enumerate(paths):
                slot = index % slots
                handle.load(path, slot=slot)
                handle.activate(slot)
                expected = peft_reference(llama_base, path)(llama_tokens).logits
                torch.testing.assert_close(model(llama_tokens).logits, expected, atol=1e-5, rtol=0)
            for slot in range(slots):
                handle.unload(slot)
            assert torch.equal(model(llama_tokens).logits, llama_base(llama_tokens).logits)
