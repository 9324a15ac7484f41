"""``loraswap bench pipeline`` end to end at its smallest: every mode serves the same requests, the loraswap
modes match eager diffusers and compile nothing after their first request. Correctness only: the timings of
a CI run mean nothing and are not asserted."""

from __future__ import annotations

import torch

from loraswap.bench.pipeline import DIFFUSERS, LORASWAP_MODES, run_pipeline_bench


def test_pipeline_bench_loraswap_modes_match_eager_without_recompiling():
    torch._dynamo.reset()
    result = run_pipeline_bench(rounds=0, steps=1, channels=32, size=16, backend="eager")
    assert result["requests_per_mode"] == 3  # one cycle of four LoRAs, less each mode's first (compiling) request
    for mode in LORASWAP_MODES:
        assert result["graphs_compiled_after_first_request"][mode] == 0, mode
        assert result["max_abs_diff_vs_eager"][mode] < 1e-4, mode
    # diffusers refuses at least the three LoRAs with text-encoder keys, other targets or kohya alphas, and
    # recompiles after falling back to unload + load
    assert result["diffusers_hotswap_fallbacks"] >= 3
    assert result["graphs_compiled_after_first_request"][DIFFUSERS] > 0
    assert result["max_abs_diff_vs_eager"][DIFFUSERS] < 1e-4
    # four prompts on four LoRAs in one routed call give the four single-prompt calls' latents
    batched = result["batched_prompts"]
    assert batched["max_abs_diff"] < 1e-4
    assert batched["graphs_compiled_while_timed"] == 0
