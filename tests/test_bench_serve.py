"""``loraswap bench serve --quick``: the traffic model runs through all four engines in seconds."""

from __future__ import annotations

from loraswap.bench.serve import ENGINES, make_traffic, run_serve_bench


def test_quick_bench_serve_runs_every_engine_on_the_same_traffic():
    result = run_serve_bench(quick=True)
    rows = {row["engine"]: row for row in result["rows"]}
    assert list(rows) == list(ENGINES)
    # greedy on the same model and adapters: the three adapter engines generate the same tokens
    assert rows["tokens"]["output_tokens"] == rows["request"]["output_tokens"] == rows["peft"]["output_tokens"] > 0
    assert all(row["requests"] == result["config"]["requests"] for row in rows.values())
    assert rows["tokens"]["itl_p50_ms"] > 0 and rows["tokens"]["ttft_p99_ms"] > 0
    assert 0 < result["adapter_flop_fraction"] < 1 and set(result["ratios"]) == {
        "tokens_per_s_vs_request", "tokens_per_s_vs_peft", "tokens_per_s_vs_base", "ttft_p99_vs_request"
    }


def test_traffic_is_poisson_arrivals_with_output_lengths_in_range_and_zipf_adapters():
    names = [f"a{i}" for i in range(50)]
    traffic = make_traffic(2000, 4.0, names, 4, 256, 1.1, seed=0, words=["the", "cat"])
    gaps = [after["at"] - before["at"] for before, after in zip(traffic, traffic[1:])]
    assert abs(sum(gaps) / len(gaps) - 0.25) < 0.03  # mean inter-arrival 1 / rate
    assert min(t["max_tokens"] for t in traffic) == 4 and max(t["max_tokens"] for t in traffic) == 256
    counts = [sum(t["adapter"] == name for t in traffic) for name in names]
    assert counts[0] > 3 * counts[9] > 0  # Zipf: the first adapter far more popular than the tenth
