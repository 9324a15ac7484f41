"""``loraswap bench pipeline``: the seed's experiment in miniature, on CPU, in one run.

A request loop cycles through four LoRAs that differ in targets, rank and format (diffusers files
with and without text-encoder layers, a kohya file with per-module alphas, a text-encoder-only
file); each request swaps in its LoRA and generates with N denoising steps. Five modes run the
same requests in alternation (one request of each mode in turn), each on its own copy of one
random-init StableDiffusionPipeline:

- eager diffusers: ``load_lora_weights`` + generate + ``unload_lora_weights`` per request;
- compiled, no swaps: unet and text encoder compiled with one LoRA loaded by diffusers that never
  changes: the speedup compilation gives when swaps cost nothing (the seed's 2.23x case);
- compiled + diffusers hotswap: ``enable_lora_hotswap(target_rank)`` then
  ``load_lora_weights(..., hotswap=True)``; where diffusers refuses (text-encoder keys, other
  targets, kohya alphas), it falls back to ``unload_lora_weights`` + ``load_lora_weights``, and
  the compiled components recompile (counted);
- compiled + loraswap slots: ``loraswap.diffusers.attach(pipe, loras, per_layer_rank=True)`` for the
  four LoRAs (each layer padded to the largest rank any of them gives it), compiled once, ``load``
  per request. Every step computes the union of the four LoRAs' layers: the price of a pipeline that
  can also route and blend.
- compiled + loraswap fused: ``attach(pipe, loras, mode="fused")``: ``load`` merges the request's
  LoRA into the weights (one merge per request, no LoRA work per step).

Then one batched call: a loraswap slots pipeline with four slots (one LoRA each, compiled once)
generates four prompts, each on its own LoRA, in one call (``route``), against four single-prompt
calls (``activate`` + generate each); the same per-prompt seeds, so the latents must agree.

Per-request medians include the swap, and each compiled mode's first request (its first
compilation) is timed apart. Speedups are over the eager median; the target is that loraswap keeps
at least 95% of the no-swap speedup with zero graphs compiled after its first request; both
loraswap modes are held to it.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..compile_guard import CompileCounter
from ..testing.synthetic_diffusers import LoraSpec, tiny_sd_pipeline, write_diffusers_lora, write_kohya_lora
from .report import format_seconds, plot_bars, print_table

EAGER = "eager diffusers"
NO_SWAP = "compiled, no swaps"
DIFFUSERS = "compiled + diffusers hotswap"
LORASWAP = "compiled + loraswap slots"
LORASWAP_FUSED = "compiled + loraswap fused"
LORASWAP_MODES = (LORASWAP, LORASWAP_FUSED)

TE_ALL = ["q_proj", "k_proj", "v_proj", "out_proj"]
BENCH_LORAS = {
    "style (unet attn, r8)": LoraSpec(targets={"unet": ["to_q", "to_k", "to_v", "to_out.0"]}, rank=8, alpha=8, seed=1),
    "character (unet + te, r16)": LoraSpec(
        targets={"unet": ["to_k", "to_v", "ff.net.0.proj"], "text_encoder": TE_ALL}, rank=16, alpha=16, seed=2
    ),
    # kohya alphas differ per module only where diffusers 0.42 applies them right (``.lora.`` keys), so that
    # eager diffusers stays a valid reference; loraswap applies every module's alpha (see loraswap.diffusers)
    "kohya (per-module alphas, r4)": LoraSpec(
        targets={"unet": ["attn1.to_q", "attn2.to_v", "proj_in", "proj_out"], "text_encoder": [*TE_ALL, "fc1"]},
        rank=4,
        alpha=4,
        alpha_pattern={"proj_out": 1.0, "proj_in": 2.0},
        seed=3,
    ),
    "prompt (te only, r8)": LoraSpec(targets={"text_encoder": [*TE_ALL, "fc1", "fc2"]}, rank=8, alpha=8, seed=4),
}
TARGET_RANK = 16


@dataclass
class Mode:
    """One way of serving requests: ``swap(name)`` makes the named LoRA current, ``pipe`` generates."""

    pipe: Any
    swap: Callable[[str], None]
    components: tuple[str, ...] = ()
    fallbacks: int = 0
    samples: list[float] = field(default_factory=list)
    first_request_s: float = 0.0
    graphs_after_first: int = 0
    max_abs_diff: float = 0.0


PROMPTS = ("a photo of a cat", "a watercolor of a harbour", "a knight in armour", "a bowl of fruit")


def generate(
    pipe, steps: int, size: int, prompts: tuple[str, ...] = PROMPTS[:1], seeds: tuple[int, ...] = (0,)
) -> torch.Tensor:
    """Latents for ``prompts`` in one call, prompt ``i`` drawn from its own generator seeded ``seeds[i]``."""
    with torch.no_grad():
        return pipe(
            list(prompts),
            num_inference_steps=steps,
            output_type="latent",
            height=size,
            width=size,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        ).images


def write_bench_loras(pipe, directory: Path) -> dict[str, Path]:
    files = {}
    for index, (name, spec) in enumerate(BENCH_LORAS.items()):
        if name.startswith("kohya"):
            files[name] = write_kohya_lora(pipe, directory / f"lora{index}.safetensors", spec)
        else:
            files[name] = write_diffusers_lora(pipe, directory / f"lora{index}", spec)
    return files


def _compile(pipe, backend: str) -> None:
    pipe.unet.compile(backend=backend)
    pipe.text_encoder.compile(backend=backend)


def eager_mode(base, files: Mapping[str, Path]) -> Mode:
    pipe = copy.deepcopy(base)

    def swap(name: str) -> None:
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(files[name]))

    return Mode(pipe, swap)


def no_swap_mode(base, files: Mapping[str, Path], backend: str) -> Mode:
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(str(next(iter(files.values()))))
    _compile(pipe, backend)
    return Mode(pipe, lambda name: None)


def diffusers_hotswap_mode(base, files: Mapping[str, Path], backend: str) -> Mode:
    pipe = copy.deepcopy(base)
    pipe.enable_lora_hotswap(target_rank=TARGET_RANK)
    mode = Mode(pipe, lambda name: None)
    compiled: list[bool] = []

    def swap(name: str) -> None:
        if not compiled:  # diffusers' order: enable_lora_hotswap, load the first LoRA, then compile
            pipe.load_lora_weights(str(files[name]), adapter_name="default_0")
            _compile(pipe, backend)
            compiled.append(True)
            return
        try:
            pipe.load_lora_weights(str(files[name]), adapter_name="default_0", hotswap=True)
        except (ValueError, RuntimeError, KeyError):
            mode.fallbacks += 1
            pipe.unload_lora_weights()
            pipe.enable_lora_hotswap(target_rank=TARGET_RANK, check_compiled="ignore")
            pipe.load_lora_weights(str(files[name]), adapter_name="default_0")

    mode.swap = swap
    return mode


def loraswap_mode(base, files: Mapping[str, Path], backend: str, fused: bool = False) -> Mode:
    from ..diffusers import attach

    pipe = copy.deepcopy(base)
    pipeline_slots = attach(pipe, list(files.values()), mode="fused" if fused else "slots", per_layer_rank=True)
    _compile(pipe, backend)
    return Mode(pipe, lambda name: pipeline_slots.load(files[name]))


def run_pipeline_bench(
    rounds: int = 3,
    steps: int = 4,
    channels: int = 64,
    size: int = 64,
    backend: str = "inductor",
    threads: int = 0,
) -> dict[str, Any]:
    """Serve ``rounds`` cycles of the four LoRAs in each mode, alternating modes request by request."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library_logging in (diffusers_logging, transformers_logging):
        library_logging.set_verbosity(library_logging.CRITICAL)  # the refused hotswaps are counted in the table
        library_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)
    base = tiny_sd_pipeline(channels=channels, text_hidden=64)
    with tempfile.TemporaryDirectory() as directory:
        files = write_bench_loras(base, Path(directory))
        modes = {
            EAGER: eager_mode(base, files),
            NO_SWAP: no_swap_mode(base, files, backend),
            DIFFUSERS: diffusers_hotswap_mode(base, files, backend),
            LORASWAP: loraswap_mode(base, files, backend),
            LORASWAP_FUSED: loraswap_mode(base, files, backend, fused=True),
        }
        names = list(files)
        requests = names * (rounds + 1)
        references: dict[str, torch.Tensor] = {}
        for index, name in enumerate(requests):
            for mode_name, mode in modes.items():
                with CompileCounter() as counter:
                    start = time.perf_counter()
                    mode.swap(name)
                    latents = generate(mode.pipe, steps, size)
                    seconds = time.perf_counter() - start
                if index == 0:
                    mode.first_request_s = seconds
                else:
                    mode.samples.append(seconds)
                    mode.graphs_after_first += counter.graphs
                if mode_name == EAGER:
                    references[name] = latents
                elif mode_name != NO_SWAP:
                    mode.max_abs_diff = max(mode.max_abs_diff, (latents - references[name]).abs().max().item())
        batched = batched_prompts(base, files, backend, rounds + 1, steps, size)
    return {**_summarise(modes, rounds, steps, channels, size, backend), "batched_prompts": batched}


ONE_CALL = "one call: 4 prompts on 4 LoRAs (route)"
FOUR_CALLS = "4 single-prompt calls (activate + generate each)"
BATCHED_TARGET = 1.0


def batched_prompts(
    base, files: Mapping[str, Path], backend: str, rounds: int, steps: int, size: int
) -> dict[str, Any]:
    """Four prompts on four LoRAs: one routed call against four single-prompt calls, alternating, same seeds."""
    from ..diffusers import attach

    pipe = copy.deepcopy(base)
    pipeline_slots = attach(pipe, list(files.values()), slots=len(files), per_layer_rank=True)
    for slot, path in enumerate(files.values()):
        pipeline_slots.load(path, slot=slot)
    _compile(pipe, backend)
    prompts = PROMPTS[: len(files)]
    ids = list(range(len(prompts)))

    def one_call() -> torch.Tensor:
        pipeline_slots.route(ids)  # one entry per prompt: PipelineSlots routes its guidance rows too
        return generate(pipe, steps, size, prompts, seeds=tuple(ids))

    def four_calls() -> torch.Tensor:
        outputs = []
        for slot, prompt in enumerate(prompts):
            pipeline_slots.activate(slot)
            outputs.append(generate(pipe, steps, size, (prompt,), seeds=(slot,)))
        return torch.cat(outputs)

    calls = {ONE_CALL: one_call, FOUR_CALLS: four_calls}
    max_abs_diff = (one_call() - four_calls()).abs().max().item()  # also the compiling warm-up of both
    samples = {name: [] for name in calls}
    with CompileCounter() as counter:
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "median_s": medians,
        "speedup": medians[FOUR_CALLS] / medians[ONE_CALL],
        "max_abs_diff": max_abs_diff,
        "graphs_compiled_while_timed": counter.graphs,
        "rounds": rounds,
    }


def _summarise(modes: Mapping[str, Mode], rounds, steps, channels, size, backend) -> dict[str, Any]:
    medians = {name: statistics.median(mode.samples) for name, mode in modes.items()}
    means = {name: statistics.fmean(mode.samples) for name, mode in modes.items()}
    speedups = {name: medians[EAGER] / seconds for name, seconds in medians.items()}
    kept = {name: speedups[name] / speedups[NO_SWAP] for name in LORASWAP_MODES}
    return {
        "model": f"StableDiffusionPipeline, random init: unet block_out_channels=({channels}, {channels * 2}), "
        f"CLIP text encoder hidden 64 x 2 layers; latents {size // 2}x{size // 2}, {steps} DDIM steps with CFG",
        "backend": backend,
        "threads": torch.get_num_threads(),
        "requests_per_mode": len(next(iter(modes.values())).samples),
        "loras": list(BENCH_LORAS),
        "request_median_s": medians,
        "request_mean_s": means,
        "first_request_s": {name: mode.first_request_s for name, mode in modes.items()},
        "graphs_compiled_after_first_request": {name: mode.graphs_after_first for name, mode in modes.items()},
        "diffusers_hotswap_fallbacks": modes[DIFFUSERS].fallbacks,
        "speedup_over_eager": speedups,
        "max_abs_diff_vs_eager": {name: modes[name].max_abs_diff for name in (DIFFUSERS, *LORASWAP_MODES)},
        "loraswap_share_of_no_swap_speedup": kept,
        "targets": [
            target
            for name in LORASWAP_MODES
            for target in (
                {
                    "target": f"{name}: 0 graphs compiled after the first request",
                    "measured": modes[name].graphs_after_first,
                    "met": modes[name].graphs_after_first == 0,
                },
                {
                    "target": f"{name}: keeps >= 95% of the no-swap speedup over eager",
                    "measured": f"{kept[name]:.1%}",
                    "met": kept[name] >= 0.95,
                },
            )
        ],
    }


def print_pipeline(result: Mapping[str, Any]) -> None:
    from rich.console import Console

    console = Console(width=150)  # seven columns: do not wrap mode names into narrow cells when piped
    print(f"{result['model']}; backend {result['backend']}, {result['threads']} threads")
    print(f"LoRAs cycled: {', '.join(result['loras'])}; {result['requests_per_mode']} timed requests per mode")
    print_table(
        "loraswap bench pipeline: one request = swap in its LoRA + generate",
        ["mode", "request (median)", "request (mean)", "first request", "graphs after first", "speedup vs eager",
         "max |diff| vs eager"],
        [
            (
                name,
                format_seconds(seconds),
                format_seconds(result["request_mean_s"][name]),
                format_seconds(result["first_request_s"][name]),
                result["graphs_compiled_after_first_request"][name],
                f"{result['speedup_over_eager'][name]:.2f}x",
                f"{result['max_abs_diff_vs_eager'][name]:.1e}" if name in result["max_abs_diff_vs_eager"] else "-",
            )
            for name, seconds in result["request_median_s"].items()
        ],
        console,
    )  # fmt: skip
    print(f"diffusers hotswap fell back to unload + load {result['diffusers_hotswap_fallbacks']} time(s)")
    print_table("targets", ["target", "measured", "met"],
                [(t["target"], t["measured"], "yes" if t["met"] else "NO") for t in result["targets"]], console)
    batched = result["batched_prompts"]
    speedup = batched["speedup"]
    print_table(
        f"4 prompts on 4 LoRAs, loraswap slots (4 slots), {batched['rounds']} alternating rounds; "
        f"max |diff| one call vs four {batched['max_abs_diff']:.1e}; "
        f"{batched['graphs_compiled_while_timed']} graphs compiled while timed",
        ["mode", "median", "speedup of one call"],
        [
            (ONE_CALL, format_seconds(batched["median_s"][ONE_CALL]),
             f"{speedup:.2f}x {'ok' if speedup >= BATCHED_TARGET else 'MISSED'} (target >= {BATCHED_TARGET}x)"),
            (FOUR_CALLS, format_seconds(batched["median_s"][FOUR_CALLS]), "1x"),
        ],
        console,
    )  # fmt: skip


def plot_pipeline(result: Mapping[str, Any], path: Path) -> None:
    values = {name: seconds * 1e3 for name, seconds in result["request_median_s"].items()}
    plot_bars(path, "Per-request median (swap + generate)", values, unit="ms",
              reference=result["request_median_s"][NO_SWAP] * 1e3, reference_label=NO_SWAP)
