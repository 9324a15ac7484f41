"""``loraswap bench``: benchmarks that time modes side by side in one process and report medians and ratios."""
