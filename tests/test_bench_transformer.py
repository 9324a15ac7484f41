"""``loraswap bench pipeline --model flux|sd3`` at its smallest: every mode serves the same LoRA stream; loraswap's
modes (one slot, four slots routed per row, fused) give diffusers' eager ``load_lora_adapter`` output for the same
LoRA and inputs and compile nothing while timed. Correctness only: the timings of a CI run mean nothing and are
not asserted."""

from __future__ import annotations

import pytest
import torch

from loraswap.bench import transformer_modes as modes
from loraswap.bench.transformer import (
    BENCH_LORAS,
    bench_inputs,
    bench_transformer,
    lora_flop_fractions,
    run_transformer_bench,
    write_bench_loras,
)


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_transformer_bench_loraswap_modes_match_eager_diffusers_without_recompiling(model):
    result = run_transformer_bench(model, rounds=1, steps=1, size="smoke", backend="eager")
    rows = result["modes"]
    others = {modes.EAGER, modes.COMPILED, modes.COMPILED_4, modes.HOTSWAP, modes.MERGE}
    assert set(rows) == others | set(modes.LORASWAP_MODES)
    for name in modes.LORASWAP_MODES:
        assert rows[name]["graphs_compiled_while_timed"] == 0, name
        assert rows[name]["max_abs_diff_vs_eager_diffusers"] < 1e-4, name
    assert rows[modes.ROUTED]["batch"] == len(BENCH_LORAS)
    # the other ways of serving the stream are exact too (the bench compares like with like)
    assert rows[modes.MERGE]["max_abs_diff_vs_eager_diffusers"] < 1e-4
    assert rows[modes.HOTSWAP]["max_abs_diff_vs_eager_diffusers"] < 1e-4
    # diffusers refuses to hotswap a LoRA onto layers the current one leaves untouched (the stream switches targets)
    assert rows[modes.HOTSWAP]["refused_swaps"] >= 1
    assert 0 < result["lora_flop_fraction"]["attention r4"] < result["lora_flop_fraction"]["union"]


def test_full_size_flux_loras_cost_a_few_percent_of_the_base(tmp_path):
    """The benchmark's size is one where LoRAs cost what they cost on real models: a few percent of a step's FLOPs."""
    base = bench_transformer("flux", "full")
    files = write_bench_loras(base, tmp_path)
    ranks = {name: modes.read_ranks(base, file) for name, file in files.items()}
    assert {rank for layer_ranks in ranks.values() for rank in layer_ranks.values()} == {4, 8, 16, 32}
    fractions = lora_flop_fractions(base, bench_inputs("flux", "full"), ranks)
    assert all(0.002 < fractions[name] < 0.05 for name in BENCH_LORAS), fractions
    assert max(fractions[name] for name in BENCH_LORAS) < fractions["union"] < 0.1


def test_routed_inputs_are_the_single_row_inputs_stacked():
    """The 4-on-4 reference runs row i alone on seed i: that is only right if row i of the batch is that input."""
    batch = bench_inputs("flux", "smoke", batch=4)
    for row in range(4):
        single = bench_inputs("flux", "smoke", batch=1, seed=row)
        for key, value in single.items():
            expected = batch[key] if key in ("img_ids", "txt_ids") else batch[key][row : row + 1]
            torch.testing.assert_close(value, expected, atol=0, rtol=0)


def test_an_unknown_model_is_refused_before_any_work(monkeypatch):
    from typer.testing import CliRunner

    from loraswap import cli

    def no_work(*args, **kwargs):
        raise AssertionError("the bench ran with an unknown --model")

    monkeypatch.setattr("loraswap.bench.transformer.run_transformer_bench", no_work)
    result = CliRunner().invoke(cli.app, ["bench", "pipeline", "--model", "sdxl"])
    assert result.exit_code == 2
    assert "--model" in result.output and "'sdxl' is not one of sd, flux, sd3" in result.output
