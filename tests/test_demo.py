"""`loraswap demo` is the README's first command: it must show zero recompiles and PEFT-exact outputs."""

from loraswap.demo import DEMO_ADAPTERS, run_demo


def test_demo_swaps_without_recompiles_and_matches_peft():
    rows = run_demo(rounds=2)
    assert [row["adapter"] for row in rows] == list(DEMO_ADAPTERS)
    assert all(row["recompiles"] == 0 for row in rows)
    assert all(row["max_abs_error"] < 1e-4 for row in rows)
