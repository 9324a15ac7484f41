"""``loraswap bench pipeline --model flux|sd3``: diffusers' "lora-fast" Flux experiment on a diffusion transformer.

A random-init ``FluxTransformer2DModel`` or ``SD3Transformer2DModel`` built offline from a config (:data:`SIZES`),
four LoRAs written by diffusers/PEFT (``save_lora_adapter``) with ranks 4-32 and four different target sets
(:data:`BENCH_LORAS`), and a stream of requests that switches LoRA at every request. A request is the swap to
its LoRA plus ``steps`` denoising steps; a step is one forward of the transformer (the rest of a pipeline call,
text encoders, scheduler and VAE, is the same in every mode and left out, so the per-request figure is
``swap + steps x step``, stated as such). The modes (:mod:`.transformer_modes`) run in one process, in a fresh
random order every round (:func:`~loraswap.bench.timing.alternating_samples`' scheme).

The LoRAs' cost is stated as FLOPs, computed from the layer shapes, the tokens each layer sees and the ranks
(:func:`lora_flop_fractions`): ``f`` of the union of the four LoRAs at each layer's largest rank is what slots
mode computes every step, so its target is ``compiled base x (1 + f)``, not the base alone.

Consistency, asserted by the CI smoke test: every loraswap mode's output equals diffusers' eager
``load_lora_adapter`` output for the same LoRA and inputs, and loraswap's modes compile nothing after warm-up.
"""

from __future__ import annotations

import copy
import random
import statistics
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compile_guard import CompileCounter
from ..testing.synthetic_diffusers import write_model_lora
from . import transformer_modes as modes_
from .report import format_seconds, print_table

# name -> (diffusers class, config, image tokens, text tokens): "full" is the benchmark, "smoke" the CI test.
SIZES: dict[str, dict[str, tuple[str, dict, int, int]]] = {
    "flux": {
        "full": ("FluxTransformer2DModel", dict(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=64, axes_dims_rope=(16, 24, 24),
        ), 1024, 256),
        "smoke": ("FluxTransformer2DModel", dict(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        ), 16, 8),
    },
    "sd3": {
        "full": ("SD3Transformer2DModel", dict(
            sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=64,
            pos_embed_max_size=64,
        ), 1024, 256),
        "smoke": ("SD3Transformer2DModel", dict(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=8,
        ), 16, 8),
    },
}  # fmt: skip

# Four LoRAs as a trainer would write them (PEFT LoraConfig options): different ranks and target sets.
BENCH_LORAS = {
    "attention r4": dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
    "joint attention r32": dict(
        r=32, lora_alpha=16, target_modules=["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    ),
    "q/v r16": dict(r=16, lora_alpha=16, target_modules=["to_q", "to_v"]),
    "feed-forward r8": dict(
        r=8, lora_alpha=8,
        target_modules=["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"],
    ),
}  # fmt: skip
ROUTED_BATCH = len(BENCH_LORAS)


def bench_transformer(model: str, size: str = "full", seed: int = 0) -> nn.Module:
    import diffusers

    class_name, config, _, _ = SIZES[model][size]
    torch.manual_seed(seed)
    return getattr(diffusers, class_name)(**config).eval()


def bench_inputs(model: str, size: str = "full", batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """One denoising step's keyword inputs; row ``i`` of a batch is drawn from seed ``seed + i`` (so row ``i`` of a
    batch equals the batch-1 inputs of seed ``seed + i``)."""
    _, config, image, text = SIZES[model][size]
    rows = [_row_inputs(model, config, image, text, seed + i) for i in range(batch)]
    inputs = {key: torch.cat([row[key] for row in rows]) for key in rows[0] if key not in ("img_ids", "txt_ids")}
    if model == "flux":
        side = int(image**0.5)
        grid = torch.cartesian_prod(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float())
        inputs.update(img_ids=grid, txt_ids=torch.zeros(text, 3))
    return inputs


def _row_inputs(model: str, config: dict, image: int, text: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    common = dict(
        encoder_hidden_states=randn(1, text, config["joint_attention_dim"]),
        pooled_projections=randn(1, config["pooled_projection_dim"]),
        timestep=torch.rand(1, generator=generator),
    )
    if model == "flux":
        return dict(hidden_states=randn(1, image, config["in_channels"]), **common)
    side = int(image**0.5) * config["patch_size"]
    return dict(hidden_states=randn(1, config["in_channels"], side, side), **common)


def write_bench_loras(base: nn.Module, directory: Path) -> dict[str, str]:
    """The four LoRAs, each written by diffusers' ``save_lora_adapter`` from PEFT's random init (seeded)."""
    return {
        name: write_model_lora(copy.deepcopy(base), directory, f"lora{index}", seed=index + 1, **options)
        for index, (name, options) in enumerate(BENCH_LORAS.items())
    }


def lora_flop_fractions(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], ranks: Mapping[str, Mapping[str, int]]
) -> dict[str, float]:
    """``{lora name: LoRA FLOPs / base FLOPs}`` per step, plus ``"union"``: every layer any LoRA targets at the
    largest rank any gives it (what slots mode computes). Base FLOPs: torch's FLOP counter over one forward
    (matmuls and attention); LoRA FLOPs: ``2 x tokens x rank x (in + out)`` per targeted Linear, its tokens read
    off that forward."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens: dict[str, int] = {}

    def count(module: nn.Module, args: tuple, output: torch.Tensor, name: str) -> None:
        tokens[name] = args[0].numel() // module.in_features

    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: count(m, args, out, name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with FlopCounterMode(display=False) as counter:
            modes_.step(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    base = counter.get_total_flops()

    def lora_flops(layer_ranks: Mapping[str, int]) -> float:
        total = 0
        for name, rank in layer_ranks.items():
            layer = model.get_submodule(name)
            total += 2 * tokens[name] * rank * (layer.in_features + layer.out_features)
        return total

    union: dict[str, int] = {}
    for layer_ranks in ranks.values():
        for name, rank in layer_ranks.items():
            union[name] = max(union.get(name, 0), rank)
    return {**{name: lora_flops(r) / base for name, r in ranks.items()}, "union": lora_flops(union) / base}


def quantiles(values: list[float]) -> tuple[float, float]:
    """``(median, p90)``."""
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def run_transformer_bench(
    model: str = "flux",
    rounds: int = 8,
    steps: int = 4,
    size: str = "full",
    backend: str = "inductor",
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Serve ``rounds`` requests per mode (each on the next of the four LoRAs), modes in a fresh random order per
    round, after a warm-up request per LoRA; see the module docstring."""
    import warnings

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # refused hotswaps are counted in the table
    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)
    torch._dynamo.reset()
    base = bench_transformer(model, size, seed)
    inputs = bench_inputs(model, size, 1, seed)
    routed_inputs = bench_inputs(model, size, ROUTED_BATCH, seed)
    names = list(BENCH_LORAS)
    with tempfile.TemporaryDirectory() as directory, torch._dynamo.config.patch(recompile_limit=64):
        files = write_bench_loras(base, Path(directory))
        references = modes_.eager_references(base, files, inputs, routed_inputs)
        ranks = {name: modes_.read_ranks(base, files[name]) for name in names}
        fractions = lora_flop_fractions(base, inputs, ranks)
        modes = modes_.build_modes(base, files, backend, inputs, routed_inputs)
        order = random.Random(seed)
        for index in range(len(names) + rounds):  # a warm-up request per LoRA, then the timed ones
            name = names[index % len(names)]
            for mode_name in order.sample(list(modes), len(modes)):
                mode = modes[mode_name]
                with CompileCounter() as counter:
                    swap_s, step_s, output = mode.request(name, steps)
                if index >= len(names):
                    mode.swap_s.append(swap_s)
                    mode.step_s.extend(step_s)
                    mode.request_s.append(swap_s + sum(step_s))
                    mode.graphs_while_timed += counter.graphs
                expected = references.get(name if mode.routed is False else modes_.ROUTED_KEY)
                if expected is not None and mode.checked:
                    mode.max_abs_diff = max(mode.max_abs_diff, (output - expected).abs().max().item())
        weight_pass_s = modes_.one_pass_over_targets(base, ranks, rounds=max(rounds, 3))
    return summarise(model, size, modes, fractions, ranks, steps, rounds, backend, weight_pass_s)


def summarise(model, size, modes, fractions, ranks, steps, rounds, backend, weight_pass_s) -> dict[str, Any]:
    rows = {}
    for name, mode in modes.items():
        step_median, step_p90 = quantiles(mode.step_s)
        request_median, request_p90 = quantiles(mode.request_s)
        swap_median, swap_p90 = quantiles(mode.swap_s)
        rows[name] = dict(
            batch=mode.batch,
            step_median_s=step_median,
            step_p90_s=step_p90,
            request_median_s=request_median,
            request_p90_s=request_p90,
            swap_median_s=swap_median,
            swap_p90_s=swap_p90,
            graphs_compiled_while_timed=mode.graphs_while_timed,
            refused_swaps=mode.refused,
            swaps=len(mode.swap_s) + len(BENCH_LORAS),
            extra_bytes=mode.extra_bytes,
            max_abs_diff_vs_eager_diffusers=mode.max_abs_diff if mode.checked else None,
        )
    step_of = {name: row["step_median_s"] for name, row in rows.items()}
    f = fractions["union"]
    ratios = {
        "slots / (compiled base x (1+f))": step_of[modes_.SLOTS] / (step_of[modes_.COMPILED] * (1 + f)),
        "routed 4-on-4 / (compiled base batch 4 x (1+f))": (
            step_of[modes_.ROUTED] / (step_of[modes_.COMPILED_4] * (1 + f))
        ),
        "fused / compiled base": step_of[modes_.FUSED] / step_of[modes_.COMPILED],
        "fused swap / one pass over the targeted weights": rows[modes_.FUSED]["swap_median_s"] / weight_pass_s,
        "compiled base speedup over eager": step_of[modes_.EAGER] / step_of[modes_.COMPILED],
    }
    request_of = {name: row["request_median_s"] for name, row in rows.items()}
    for other in (modes_.MERGE, modes_.HOTSWAP):
        for mine in (modes_.SLOTS, modes_.FUSED):
            ratios[f"{other} / {mine}, per request"] = request_of[other] / request_of[mine]
    targets = {
        "slots / (compiled base x (1+f))": 1.03,
        "routed 4-on-4 / (compiled base batch 4 x (1+f))": 1.05,
        "fused / compiled base": 1.01,
        "fused swap / one pass over the targeted weights": 1.5,
    }
    _, config, image, text = SIZES[model][size]
    return {
        "model": f"{SIZES[model][size][0]}, random init, {config}; {image} image + {text} text tokens, fp32",
        "size": size,
        "backend": backend,
        "threads": torch.get_num_threads(),
        "steps_per_request": steps,
        "timed_requests_per_mode": rounds,
        "loras": {name: {"layers": len(r), "ranks": sorted(set(r.values()))} for name, r in ranks.items()},
        "lora_flop_fraction": fractions,
        "modes": rows,
        "ratios": ratios,
        "targets": [
            {"target": f"{name} <= {limit}", "measured": round(ratios[name], 4), "met": ratios[name] <= limit}
            for name, limit in targets.items()
        ],
        "one_pass_over_targeted_weights_s": weight_pass_s,
    }


def print_transformer(result: Mapping[str, Any]) -> None:
    from rich.console import Console

    console = Console(width=170)
    print(f"{result['model']}; backend {result['backend']}, {result['threads']} thread(s)")
    fractions = ", ".join(f"{name} {value:.2%}" for name, value in result["lora_flop_fraction"].items())
    print(f"LoRA FLOPs / base FLOPs per step: {fractions}")
    print(
        f"{result['timed_requests_per_mode']} timed requests per mode, each on the next LoRA (every request switches); "
        f"request = swap + {result['steps_per_request']} steps (one transformer forward each)"
    )
    print_table(
        "loraswap bench pipeline: per denoising step and per request",
        ["mode", "batch", "step median", "step p90", "request median", "request p90", "swap median",
         "graphs while timed", "refused swaps", "extra memory", "max |diff| vs eager diffusers"],
        [
            (name, row["batch"], format_seconds(row["step_median_s"]), format_seconds(row["step_p90_s"]),
             format_seconds(row["request_median_s"]), format_seconds(row["request_p90_s"]),
             format_seconds(row["swap_median_s"]), row["graphs_compiled_while_timed"],
             f"{row['refused_swaps']}/{row['swaps']}" if row["refused_swaps"] is not None else "-",
             f"{row['extra_bytes'] / 2**20:.1f} MiB",
             "-" if row["max_abs_diff_vs_eager_diffusers"] is None else f"{row['max_abs_diff_vs_eager_diffusers']:.1e}")
            for name, row in result["modes"].items()
        ],
        console,
    )  # fmt: skip
    print_table("ratios (one run)", ["ratio", "value"], [(k, f"{v:.3f}") for k, v in result["ratios"].items()], console)
    print_table("targets", ["target", "measured", "met"],
                [(t["target"], t["measured"], "yes" if t["met"] else "NO") for t in result["targets"]], console)


def plot_transformer(result: Mapping[str, Any], path: Path) -> None:
    """Per-step and per-request medians side by side, the compiled base's marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit("--plot needs matplotlib: pip install 'loraswap[plot]'") from err
    rows = result["modes"]
    labels = [name if "batch" in name else f"{name} (batch {row['batch']})" for name, row in rows.items()]
    figure, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
    for axis, key, title in ((axes[0], "step_median_s", "per denoising step"), (axes[1], "request_median_s",
                             f"per request (swap + {result['steps_per_request']} steps)")):  # fmt: skip
        axis.barh(labels, [row[key] * 1e3 for row in rows.values()], color="#4C72B0")
        axis.axvline(rows[modes_.COMPILED][key] * 1e3, color="#C44E52", linestyle="--", label=modes_.COMPILED)
        axis.set_xlabel("ms (median)")
        axis.set_title(title)
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right")
    figure.suptitle(f"{result['model'].split(',')[0]}: f(union of LoRAs) = {result['lora_flop_fraction']['union']:.1%}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
