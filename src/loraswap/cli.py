"""The ``loraswap`` command line (also ``python -m loraswap``)."""

from __future__ import annotations

import json
import sys

import typer

from .errors import HotswapError

app = typer.Typer(help="Hot-swap LoRA adapters in a torch.compile'd model without recompiling.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: modes timed side by side in one run, medians and ratios.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@app.command()
def demo(
    rounds: int = typer.Option(5, help="How many times to cycle through the three adapters."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Compile a tiny Llama once, swap three PEFT adapters through it, check against PEFT."""
    from .demo import print_demo, run_demo

    rows = run_demo(rounds=rounds)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_demo(rows)
    if any(row["recompiles"] for row in rows) or any(row["max_abs_error"] > 1e-4 for row in rows):
        raise typer.Exit(1)


def main() -> None:
    """Entry point: bad input exits 2 with one line, no traceback unless --debug."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        app(standalone_mode=False)
    except HotswapError as err:
        if debug:
            raise
        print(f"loraswap: error: {err}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except Exception as err:  # click's usage errors
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(2)
        raise
