"""Printing benchmark results: a rich table for people, JSON for machines, an optional plot."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def format_seconds(seconds: float) -> str:
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if abs(seconds) < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], console: Console | None = None) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    (console or Console()).print(table)


def emit(result: Mapping[str, Any], as_json: bool, render, plot: Path | None = None, plot_fn=None) -> None:
    """Print ``result`` as JSON or via ``render(result)``; draw ``plot_fn(result, plot)`` when asked."""
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        render(result)
    if plot is not None and plot_fn is not None:
        plot_fn(result, plot)


def plot_bars(path: Path, title: str, values: Mapping[str, float], unit: str = "ms", reference: float | None = None,
              reference_label: str = "") -> None:
    """A horizontal bar chart of ``values`` (label -> number in ``unit``), with an optional reference line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit("--plot needs matplotlib: pip install 'loraswap[plot]'") from err
    figure, axes = plt.subplots(figsize=(7, 0.5 * len(values) + 1.5))
    labels = list(values)
    axes.barh(labels, [values[label] for label in labels], color="#4C72B0")
    axes.invert_yaxis()
    if reference is not None:
        axes.axvline(reference, color="#C44E52", linestyle="--", label=reference_label)
        axes.legend(loc="lower right")
    axes.set_xlabel(unit)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
