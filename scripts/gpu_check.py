"""One prepared GPU check of loraswap: run it whenever a CUDA device is lent, paste its table.

    PYTHONPATH=src python scripts/gpu_check.py

Sections (each in its own try/except: a failure is a FAILED row with the error, the rest still run):

1. warm swap: ``load`` of a cached adapter (pinned host memory) against the host-to-device copy floor
   of the same bytes;
2. swap on the side stream while forwards run: how much of the swap hides behind the forwards;
3. ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) after loads, routes and blends: graphs
   compiled and CUDA graphs recorded after warm-up (both must be 0), outputs against eager;
4. routed bf16 batch (4 slots, default capacity) against swapping per adapter group (target >= 2x);
5. fused mode: merge time per swap on the GPU, output against PEFT;
6. slots over a torchao float8 weight-only base under compile: no recompile across loads, error
   against the bf16 model with the same adapter.

Meant to finish in well under 6 minutes on one H100. Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

HIDDEN, LAYERS, VOCAB, ROWS, TOKENS = 1024, 4, 4096, 16, 128
ADAPTERS = {
    "attn-r16": dict(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp-r32": dict(r=32, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    "all-r64": dict(r=64, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"]),
}


def cuda_median(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn`` with the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _status(met: bool) -> str:
    return "ok" if met else "MISSED"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


class Check:
    """The shared setup: a Llama-style model on CUDA and four PEFT adapters written to disk."""

    def __init__(self, directory: Path) -> None:
        from loraswap.testing.synthetic import tiny_llama, write_adapters

        self.base_cpu = tiny_llama(hidden=HIDDEN, layers=LAYERS, vocab=VOCAB)
        self.paths = list(write_adapters(self.base_cpu, directory, ADAPTERS).values())
        self.tokens = torch.randint(0, VOCAB, (ROWS, TOKENS), device="cuda")

    def attached(self, dtype: torch.dtype, slots: int = 4, **options):
        import loraswap

        model = copy.deepcopy(self.base_cpu).to("cuda", dtype)
        capacity = loraswap.Capacity.for_adapters(self.paths, model=model, slots=slots)
        return model, loraswap.attach(model, capacity, **options)

    def peft(self, path: Path, dtype: torch.dtype):
        from loraswap.testing.synthetic import peft_reference

        return peft_reference(self.base_cpu, path).to("cuda", dtype)


def warm_swap(check: Check) -> list[tuple[str, str, str, str]]:
    model, slots = check.attached(torch.bfloat16)
    for path in check.paths:
        slots.prefetch(path).result()
    loads = itertools.count()
    swap = cuda_median(lambda: slots.load(check.paths[next(loads) % 2], slot=1))
    nbytes = slots.layout.slot_nbytes
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    floor = cuda_median(lambda: device.copy_(host, non_blocking=True))
    ratio = swap / floor
    return [
        ("warm swap (cached, pinned)", f"{ms(swap)} for {nbytes / 2**20:.1f} MiB", "-", "measured"),
        ("host-to-device copy floor", f"{ms(floor)} ({nbytes / floor / 2**30:.1f} GiB/s)", "-", "measured"),
        ("warm swap / floor", f"{ratio:.2f}x", "<= 2x", _status(ratio <= 2)),
    ]


def side_stream_overlap(check: Check) -> list[tuple[str, str, str, str]]:
    model, slots = check.attached(torch.bfloat16)
    for slot, path in enumerate(check.paths):
        slots.load(path, slot=slot)
    slots.activate(0)
    forwards = 8

    def run_forwards() -> None:
        with torch.no_grad():
            for _ in range(forwards):
                model(check.tokens)

    loads = itertools.count()

    def swaps() -> None:
        for _ in range(forwards):
            slots.load(check.paths[1 + next(loads) % 3], slot=3)  # a slot no row reads

    def both() -> None:
        with torch.no_grad():
            for _ in range(forwards):
                model(check.tokens)
                slots.load(check.paths[1 + next(loads) % 3], slot=3)

    alone, swap, together = cuda_median(run_forwards, 5), cuda_median(swaps, 5), cuda_median(both, 5)
    hidden = (alone + swap - together) / swap
    return [
        ("forwards alone / swaps alone", f"{ms(alone)} / {ms(swap)} ({forwards} each)", "-", "measured"),
        ("forwards + swaps on the side stream", f"{ms(together)}: {hidden:.0%} of the swap time hidden", "> 50%",
         _status(hidden > 0.5)),
    ]


def cuda_graph_recordings() -> Callable[[], int]:
    """Count CUDA graphs recorded by inductor's cudagraph trees from now on."""
    from torch._inductor import cudagraph_trees

    recorded = [0]
    original = cudagraph_trees.CUDAGraphNode.__init__

    def counting_init(self, *args, **kwargs):
        recorded[0] += 1
        original(self, *args, **kwargs)

    cudagraph_trees.CUDAGraphNode.__init__ = counting_init
    return lambda: recorded[0]


def reduce_overhead(check: Check) -> list[tuple[str, str, str, str]]:
    import loraswap
    from loraswap.compile_guard import CompileCounter

    model, slots = check.attached(torch.bfloat16)
    for slot, path in enumerate(check.paths):
        slots.load(path, slot=slot)
    compiled = torch.compile(model, mode="reduce-overhead")
    recordings = cuda_graph_recordings()
    steps = [
        ("activate 0", lambda: slots.activate(0)),
        ("load slot 0", lambda: slots.load(check.paths[2], slot=0)),
        ("route", lambda: slots.route([i % 4 for i in range(ROWS)])),
        ("blend", lambda: slots.blend({1: 1.0})),
        ("route -1s", lambda: slots.route([-1, 3] * (ROWS // 2))),
    ]
    with torch.no_grad():
        for _ in range(3):  # warm-up: compile, record, replay
            slots.activate(0)
            compiled(check.tokens)
        before = recordings()
        worst = 0.0
        with CompileCounter() as counter, loraswap.no_recompile():
            for _ in range(2):
                for _, step in steps:
                    step()
                    out = compiled(check.tokens).logits.clone()
                    eager = model(check.tokens).logits
                    worst = max(worst, (out.float() - eager.float()).abs().max().item())
        recaptures = recordings() - before
    return [
        ("reduce-overhead: graphs compiled after warm-up", str(counter.graphs), "0", _status(counter.graphs == 0)),
        ("reduce-overhead: CUDA graphs recorded after warm-up", str(recaptures), "0", _status(recaptures == 0)),
        ("reduce-overhead vs eager after each verb", f"max |diff| {worst:.2e}", "<= 5e-2 (bf16)",
         _status(worst <= 5e-2)),
    ]


def routed_vs_per_group(check: Check) -> list[tuple[str, str, str, str]]:
    model, slots = check.attached(torch.bfloat16)
    for slot, path in enumerate(check.paths):
        slots.load(path, slot=slot)
    compiled = torch.compile(model)
    mix = [row % 4 for row in range(ROWS)]
    groups = {slot: check.tokens[[row for row, s in enumerate(mix) if s == slot]] for slot in range(4)}

    def routed() -> None:
        slots.route(mix)
        compiled(check.tokens)

    def per_group() -> None:
        for slot, rows in groups.items():
            slots.activate(slot)
            compiled(rows)

    with torch.no_grad():
        routed_s, per_group_s = cuda_median(routed), cuda_median(per_group)
    speedup = per_group_s / routed_s
    return [
        ("bf16 routed batch (4 slots) / per-group swaps", f"{ms(routed_s)} / {ms(per_group_s)}: {speedup:.2f}x",
         ">= 2x", _status(speedup >= 2)),
    ]


def fused_merges(check: Check) -> list[tuple[str, str, str, str]]:
    model, fused = check.attached(torch.bfloat16, slots=1, mode="fused")
    loads = itertools.count()
    merge = cuda_median(lambda: fused.load(check.paths[next(loads) % 4]))
    fused.load(check.paths[1])
    with torch.no_grad():
        out = model(check.tokens).logits.float()
        reference = check.peft(check.paths[1], torch.bfloat16)(check.tokens).logits.float()
    error = (out - reference).abs().max().item()
    return [
        ("fused merge per swap (bf16)", ms(merge), "-", "measured"),
        ("fused vs PEFT bf16", f"max |diff| {error:.2e}", "<= 5e-2", _status(error <= 5e-2)),
    ]


def float8_base(check: Check) -> list[tuple[str, str, str, str]]:
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    import loraswap

    model = copy.deepcopy(check.base_cpu).to("cuda", torch.bfloat16)
    quantize_(model, Float8WeightOnlyConfig(), filter_fn=lambda module, name: isinstance(module, torch.nn.Linear))
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters(check.paths, model=model, slots=4))
    compiled = torch.compile(model)
    worst = 0.0
    with torch.no_grad():
        slots.load(check.paths[0], slot=0)
        compiled(check.tokens)
        with loraswap.no_recompile():
            for slot, path in enumerate(check.paths):
                slots.load(path, slot=slot)
                slots.activate(slot)
                out = compiled(check.tokens).logits.float()
                reference = check.peft(path, torch.bfloat16)(check.tokens).logits.float()
                worst = max(worst, (out - reference).abs().max().item())
    return [
        ("float8 weight-only base + slots, compiled: recompiles", "0 (no_recompile held)", "0", "ok"),
        ("float8 base vs bf16 PEFT, 4 adapters", f"max |diff| {worst:.2e}", "report", "measured"),
    ]


SECTIONS = {
    "warm swap": warm_swap,
    "side stream": side_stream_overlap,
    "reduce-overhead": reduce_overhead,
    "routed vs per-group": routed_vs_per_group,
    "fused": fused_merges,
    "float8 base": float8_base,
}


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device available, nothing to check")
        return 0
    start = time.perf_counter()
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as directory:
        try:
            check = Check(Path(directory))
        except Exception as error:  # noqa: BLE001 - the table reports it
            traceback.print_exc()
            rows.append(("setup", f"FAILED: {type(error).__name__}: {error}", "-", "FAILED"))
            check = None
        for name, section in SECTIONS.items():
            if check is None:
                break
            section_start = time.perf_counter()
            try:
                rows.extend(section(check))
            except Exception as error:  # noqa: BLE001 - one failed section must not hide the others
                traceback.print_exc()
                rows.append((name, f"FAILED: {type(error).__name__}: {str(error)[:200]}", "-", "FAILED"))
            print(f"[{name}: {time.perf_counter() - section_start:.0f} s]", file=sys.stderr, flush=True)
            torch._dynamo.reset()
    print(f"loraswap gpu_check on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{time.perf_counter() - start:.0f} s")
    width = max(len(row[0]) for row in rows)
    for check_name, measured, target, status in rows:
        print(f"| {check_name:<{width}} | {measured} | {target} | {status} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
