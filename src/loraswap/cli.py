"""The ``loraswap`` command line (also ``python -m loraswap``)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import typer

from . import __version__
from .errors import HotswapError

app = typer.Typer(
    help="Hot-swap LoRA adapters in a torch.compile'd model without recompiling. Errors on bad input print one "
    "line and exit 2; add --debug anywhere for the traceback.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench_app = typer.Typer(help="Benchmarks: modes timed side by side in one run, medians and ratios.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

EXTRAS = {
    "peft": ("peft", "transformers"),
    "diffusers": ("diffusers", "peft", "transformers"),
    "plot": ("matplotlib",),
    "serve": ("ray", "fastapi", "transformers", "peft"),
}


def _print_version(value: bool) -> None:
    if value:
        print(f"loraswap {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print loraswap's version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="On bad input, raise with the full traceback instead of one line (anywhere on the line)."
    ),
) -> None:
    """Options before any command; ``--debug`` itself is taken off the command line by :func:`main`."""


def require_extra(extra: str, what: str) -> None:
    """Exit 2 with one line naming the install command when ``extra``'s packages are missing: before any work."""
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        print(
            f"loraswap: error: {what} needs {', '.join(missing)}, which is not installed: "
            f"pip install 'loraswap[{extra}]' (in a checkout: pip install -e '.[{extra}]')",
            file=sys.stderr,
        )
        raise typer.Exit(2)


def require_plot(plot: Path | None) -> None:
    if plot is not None:
        require_extra("plot", "--plot")


@app.command()
def demo(
    rounds: int = typer.Option(5, min=1, help="How many times to cycle through the three adapters."),
    backend: str = typer.Option("inductor", help="torch.compile backend."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Compile a tiny Llama once, swap three PEFT adapters through it, check against PEFT."""
    require_extra("peft", "demo")
    from rich.console import Console

    from .demo import print_demo, run_demo

    console = Console(stderr=True)
    rows = run_demo(rounds=rounds, backend=backend, progress=lambda step: console.print(f"[dim]{step}[/dim]", highlight=False))
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_demo(rows)
    if any(row["recompiles"] for row in rows) or any(row["max_abs_error"] > 1e-4 for row in rows):
        raise typer.Exit(1)


@app.command("inspect")
def inspect_command(
    paths: list[str] = typer.Argument(
        ..., metavar="PATH", help="Adapter folders, .safetensors files, hub ids, or folders of adapters."
    ),
    layers: bool = typer.Option(False, "--layers", help="Also print every layer's rank, alpha, scaling and shapes."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Describe LoRA adapters from their safetensors headers and configs, without loading a tensor.

    Over several adapters, one that cannot be read gets a row saying why, and the exit code is 1.
    """
    from .formats.locate import adapter_paths
    from .info import inspect, print_infos

    sources = adapter_paths(paths)
    if len(sources) == 1:
        infos, failures = [inspect(sources[0])], {}
    else:
        infos, failures = _inspect_each(sources)
    if as_json:
        rows = [info.to_dict() for info in infos] + [{"source": s, "error": e} for s, e in failures.items()]
        print(json.dumps(rows, indent=2))
    else:
        if infos:
            print_infos(infos, show_layers=layers)
        if failures:
            from .bench.report import print_table

            print_table("not readable as LoRA adapters", ["adapter", "why"], list(failures.items()))
    if failures:
        raise typer.Exit(1)


def _inspect_each(sources: list[str]):
    """``(infos, {source: why})``: every adapter inspected, a failure recorded instead of ending the listing."""
    from .info import inspect

    infos, failures = [], {}
    for source in _progress(sources, "inspecting"):
        try:
            infos.append(inspect(source))
        except HotswapError as err:
            failures[source] = " ".join(str(err).split())
    return infos, failures


@app.command("plan")
def plan_command(
    paths: list[str] = typer.Argument(
        ..., metavar="PATH", help="Adapter folders, .safetensors files, hub ids, or folders of adapters."
    ),
    model: str = typer.Option(
        ..., "--model", help="Base model: a local transformers/diffusers model or pipeline folder, or a hub id."
    ),
    slots: int = typer.Option(1, "--slots", min=1, help="Adapters resident on the device at once."),
    per_layer_rank: bool = typer.Option(False, "--per-layer-rank", help="Size each layer to its own largest rank."),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype: auto (its config's), float32, bfloat16, float16."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """The Capacity these adapters need on MODEL (built on the meta device, no weights) and its cost in bytes.

    Exits 1 when an adapter cannot fit (the table says why).
    """
    from torch import nn

    from .formats.locate import adapter_paths
    from .info import inspect
    from .plan import DTYPES, build_meta_model, plan, plan_pipeline, print_plan

    if dtype != "auto" and dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of auto, {', '.join(DTYPES)}", param_hint="--dtype")
    infos = [inspect(source) for source in _progress(adapter_paths(paths), "inspecting")]
    built = build_meta_model(model, dtype)
    if isinstance(built, nn.Module):
        result = plan(infos, built, model_name=model, slots=slots, per_layer_rank=per_layer_rank)
    elif per_layer_rank:
        raise typer.BadParameter("not available for diffusers pipelines yet", param_hint="--per-layer-rank")
    else:
        result = plan_pipeline(infos, built, model_name=model, slots=slots)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_plan(result)
    if len(result.fitting) < len(result.adapters):
        raise typer.Exit(1)


def _progress(items: list[str], what: str):
    """``items``, with a progress bar on stderr when there are many."""
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    many = len(items) >= 8 and console.is_terminal
    return track(items, description=what, console=console, transient=True, disable=not many)


@app.command("serve")
def serve_command(
    model: str = typer.Argument(..., help="A transformers causal LM or diffusers pipeline folder (or a cached hub id)."),
    adapters: Path = typer.Option(..., "--adapters", help="Folder of adapters: PEFT folders and .safetensors files."),
    replicas: int = typer.Option(2, min=1, help="Ray Serve replicas, each a compiled model with its adapter pool."),
    slots: int = typer.Option(4, min=1, help="Adapters resident in each replica at once."),
    max_batch: int = typer.Option(
        8, "--max-batch", min=1, help="Text: rows of the token-level batch (one forward per step). Images: requests per pipeline call."
    ),
    max_model_len: int = typer.Option(
        None, "--max-model-len", min=2, help="Text: prompt + answer tokens a row holds (KV cache length). Default: the model's context, at most 2048."
    ),
    host: str = typer.Option("127.0.0.1", help="Address the HTTP server listens on (Ray itself stays on loopback)."),
    port: int = typer.Option(8000, help="HTTP port."),
    backend: str = typer.Option("inductor", help="torch.compile backend."),
    sizes: list[str] = typer.Option(
        None, "--sizes", help="Image sizes (WxH) a pipeline serves, each compiled at start. Default: the pipeline's own default size."
    ),
) -> None:
    """OpenAI-compatible multi-LoRA server on Ray Serve: /v1/models, /v1/completions, /v1/chat/completions (streaming),
    /v1/images/generations, /v1/stats, /metrics."""
    from .serve.ray_local import configure_ray_env

    configure_ray_env()  # before require_extra imports ray: Ray reads its environment at import
    require_extra("serve", "serve")
    from .serve.app import serve_forever

    serve_forever(
        model, str(adapters), host=host, port=port, replicas=replicas, slots=slots, max_batch=max_batch,
        max_model_len=max_model_len, backend=backend, sizes=sizes,
    )


@bench_app.command("mixed")
def bench_mixed(
    rounds: int = typer.Option(50, help="Alternating timing rounds (each times every mode once)."),
    peft_mixes: int = typer.Option(3, min=1, help="New mixes to time on PEFT's compiled model (each recompiles)."),
    dtype: list[str] = typer.Option(["float32", "bfloat16"], "--dtype", help="Model dtype(s): float32, bfloat16."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    plot: Path = typer.Option(None, "--plot", help="Write a bar chart to this PNG file."),
) -> None:
    """Rows of one batch on different adapters in one compiled forward (4, 8, 16 slots) vs one slot, PEFT, per-group."""
    require_extra("peft", "bench mixed")
    require_plot(plot)
    from .bench.mixed import DTYPES, plot_mixed, print_mixed, run_mixed
    from .bench.report import emit

    unknown = [name for name in dtype if name not in DTYPES]
    if unknown:
        raise typer.BadParameter(f"{unknown[0]!r} is not one of {', '.join(DTYPES)}", param_hint="--dtype")
    emit(run_mixed(rounds=rounds, peft_mixes=peft_mixes, dtypes=tuple(dtype)), as_json, print_mixed, plot, plot_mixed)


@bench_app.command("swap")
def bench_swap(
    rounds: int = typer.Option(100, help="Timing rounds (each adapter gets a quarter of them)."),
    threads: int = typer.Option(0, help="torch.set_num_threads for the run (0: torch's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    plot: Path = typer.Option(None, "--plot", help="Write a bar chart to this PNG file."),
) -> None:
    """One adapter swap: PEFT's hotswap_adapter against loraswap cold, warm, activate and the memory-copy floor."""
    require_extra("peft", "bench swap")
    require_plot(plot)
    from .bench.report import emit
    from .bench.swap import plot_swap, print_swap, run_swap

    emit(run_swap(rounds=rounds, threads=threads), as_json, print_swap, plot, plot_swap)


@bench_app.command("pool")
def bench_pool(
    adapters: int = typer.Option(200, min=2, help="Adapters in the catalogue (ranks 4-64, five target sets)."),
    batches: int = typer.Option(200, min=1, help="Timed batches per mode (after the warm-up batches)."),
    rows: int = typer.Option(8, min=1, help="Rows per batch."),
    tokens: int = typer.Option(32, min=1, help="Tokens per row."),
    slots: int = typer.Option(8, min=1, help="Slots of the pool (and adapters PEFT keeps loaded)."),
    zipf: float = typer.Option(1.1, help="Zipf exponent of the traffic over the catalogue."),
    cache_fraction: float = typer.Option(0.25, help="Host cache size, as a fraction of the catalogue."),
    backend: str = typer.Option("inductor", help="torch.compile backend of the compiled modes."),
    threads: int = typer.Option(0, help="torch.set_num_threads for the run (0: torch's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """A catalogue of adapters served through a few slots with Zipf traffic: the pool against PEFT."""
    require_extra("peft", "bench pool")
    from .bench.pool import print_pool, run_pool
    from .bench.report import emit

    result = run_pool(
        adapters=adapters, batches=batches, rows=rows, tokens=tokens, slots=slots, zipf=zipf,
        cache_fraction=cache_fraction, backend=backend, threads=threads,
    )
    emit(result, as_json, print_pool)


@bench_app.command("forward")
def bench_forward(
    sets: str = typer.Option(
        "abd", help="Adapter sets to run: a (ranks 8-64), b (one rank-128 layer type, others 4-8), d (DoRA vs plain)."
    ),
    rounds: int = typer.Option(60, help="Alternating timing rounds."),
    seq: int = typer.Option(128, help="Tokens per forward (batch 1)."),
    threads: int = typer.Option(1, help="torch threads (1: steadier on a shared CPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    plot: Path = typer.Option(None, "--plot", help="Write a bar chart to this PNG file."),
) -> None:
    """Per-forward cost of base, slots (uniform and per-layer rank), fused and PEFT's hotswap-prepared model."""
    require_extra("peft", "bench forward")
    require_plot(plot)
    from .bench.forward import plot_forward, print_forward, run_forward
    from .bench.report import emit

    emit(run_forward(sets=sets, rounds=rounds, seq=seq, threads=threads), as_json, print_forward, plot, plot_forward)


@bench_app.command("pipeline")
def bench_pipeline(
    model: str = typer.Option("sd", "--model", help="sd: a tiny SD1.5 pipeline (UNet + text encoder); flux, sd3: a "
                              "diffusion transformer's denoising step (diffusers' lora-fast experiment)."),
    rounds: int = typer.Option(None, help="sd: cycles through the four LoRAs, plus one (default 3); flux/sd3: timed "
                               "requests per mode, after a warm-up request per LoRA (default 8)."),
    steps: int = typer.Option(4, help="Denoising steps per request."),
    channels: int = typer.Option(32, help="sd: UNet block_out_channels[0] (the model size)."),
    size: int = typer.Option(32, help="sd: image height and width in pixels (latents are half that)."),
    tiny: bool = typer.Option(False, "--tiny", help="flux/sd3: the smallest transformer (the CI smoke size)."),
    backend: str = typer.Option("inductor", help="torch.compile backend of the compiled modes."),
    threads: int = typer.Option(None, help="torch.set_num_threads for the run (sd: torch's default; flux/sd3: 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    plot: Path = typer.Option(None, "--plot", help="Write a bar chart to this PNG file."),
) -> None:
    """A compiled diffusion model serving four LoRAs: eager, compiled, diffusers hotswap, merge-on-load, loraswap."""
    require_extra("diffusers", "bench pipeline")
    require_plot(plot)
    from .bench.report import emit

    if model == "sd":
        from .bench.pipeline import plot_pipeline, print_pipeline, run_pipeline_bench

        result = run_pipeline_bench(
            rounds=3 if rounds is None else rounds, steps=steps, channels=channels, size=size, backend=backend,
            threads=threads or 0,
        )
        emit(result, as_json, print_pipeline, plot, plot_pipeline)
        return
    from .bench.transformer import SIZES, plot_transformer, print_transformer, run_transformer_bench

    if model not in SIZES:
        raise typer.BadParameter(f"{model!r} is not one of sd, {', '.join(SIZES)}", param_hint="--model")
    result = run_transformer_bench(
        model, rounds=8 if rounds is None else rounds, steps=steps, size="smoke" if tiny else "full",
        backend=backend, threads=1 if threads is None else threads,
    )
    emit(result, as_json, print_transformer, plot, plot_transformer)


@bench_app.command("serve")
def bench_serve(
    requests: int = typer.Option(64, min=1, help="Requests in the traffic (the same schedule for every engine)."),
    rate: float = typer.Option(1.0, min=0.01, help="Poisson arrival rate, requests per second."),
    adapters: int = typer.Option(50, min=1, help="PEFT adapters served (Zipf popularity)."),
    min_tokens: int = typer.Option(4, min=1, help="Shortest answer (output lengths log-uniform in [min, max])."),
    max_tokens: int = typer.Option(256, min=1, help="Longest answer."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Rows of the token-level batch; requests per batch before."),
    slots: int = typer.Option(8, min=1, help="Adapters resident at once (loraswap slots; PEFT adapters kept loaded)."),
    hidden: int = typer.Option(512, help="Llama hidden size (the model size)."),
    layers: int = typer.Option(4, help="Llama layers."),
    vocab: int = typer.Option(2048, help="Vocabulary size."),
    zipf: float = typer.Option(1.1, help="Zipf exponent of the adapters' popularity."),
    backend: str = typer.Option("inductor", help="torch.compile backend of the compiled engines."),
    threads: int = typer.Option(0, help="torch.set_num_threads for the run (0: torch's default)."),
    engine: list[str] = typer.Option(None, "--engine", help="Engines to run (repeatable): tokens, request, peft, tokens-base. Default: all."),
    quick: bool = typer.Option(False, "--quick", help="A smoke run of seconds: a tiny model, 6 requests, eager."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """A traffic model (Poisson arrivals, 4-256 output tokens, Zipf over 50 adapters) through the token-level engine,
    the request-level engine, PEFT, and the token-level engine on the base model: tokens/s, TTFT and ITL p50/p99, recompiles."""
    require_extra("serve", "bench serve")
    from .bench.report import emit
    from .bench.serve import ENGINES, print_serve, run_serve_bench

    unknown = [name for name in engine or () if name not in ENGINES]
    if unknown:
        raise typer.BadParameter(f"{unknown[0]!r} is not one of {', '.join(ENGINES)}", param_hint="--engine")
    result = run_serve_bench(
        requests=requests, rate=rate, adapters=adapters, min_tokens=min_tokens, max_tokens=max_tokens, max_batch=max_batch,
        slots=slots, hidden=hidden, layers=layers, vocab=vocab, zipf=zipf, backend=backend, threads=threads,
        engines=tuple(engine) if engine else ENGINES, quick=quick,
    )
    emit(result, as_json, print_serve)


def main() -> None:
    """Entry point: bad input exits 2 with one line, no traceback unless --debug (anywhere on the line).

    typer runs in standalone mode, so usage errors (exit 2), ``--help`` and ``typer.Exit`` codes
    behave as typer makes them; only loraswap's own errors on bad input are turned into one line.
    """
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        app()
    except HotswapError as err:
        if debug:
            raise
        print(f"loraswap: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
