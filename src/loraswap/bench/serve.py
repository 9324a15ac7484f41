"""``loraswap bench serve``: one traffic model through four text engines, in this process, as a replica runs them.

Traffic: ``requests`` requests with Poisson arrivals at ``rate`` per second, prompts of 8 to 32 words, output
lengths drawn log-uniformly from ``min_tokens`` to ``max_tokens`` (greedy, so every engine produces the same
tokens; a random model's end-of-sequence token may cut one short, for every engine alike), adapters drawn from
``adapters`` PEFT adapters with Zipf popularity. Engines, each fed the same schedule from one asyncio loop:

- ``tokens``: the token-level engine (:class:`~loraswap.serve.text.TextService`, the replica's text path);
- ``request``: the request-level engine of before (:class:`~loraswap.serve.model.TextEngine` behind the
  :class:`~loraswap.serve.batcher.Batcher`: a batch runs ``generate()`` to completion);
- ``peft``: PEFT's eager model, one adapter per batch (:class:`~loraswap.serve.model.PeftTextEngine`);
- ``tokens-base``: the token-level engine on the base model with no adapter attached, every request on the base.

Measured per engine: output tokens/s over the run, time to first token (arrival to first token) p50/p99, inter-
token latency p50/p99 (request-level engines answer whole: their tokens arrive at once, so ITL is not reported),
recompiles after warm-up. No HTTP and no Ray: the engines are compared, not the transport.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

ENGINES = ("tokens", "request", "peft", "tokens-base")
PROJECTIONS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]]


def zipf_models(names: list[str], count: int, exponent: float, seed: int) -> list[str]:
    """``count`` adapter names drawn with probability proportional to ``1 / rank**exponent``."""
    weights = [1.0 / (rank + 1) ** exponent for rank in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=count)


def adapter_spec(index: int) -> dict:
    return dict(r=(4, 8, 16)[index % 3], lora_alpha=16, target_modules=PROJECTIONS[index % 3])


def write_bench_models(root: Path, adapters: int, hidden: int, layers: int, vocab: int) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM

    from ..testing.synthetic import tiny_llama_folder, write_adapters

    folder = tiny_llama_folder(root / "bench-llama", hidden=hidden, layers=layers, vocab=vocab)
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    write_adapters(base, root / "adapters", {f"adapter-{index:02d}": adapter_spec(index) for index in range(adapters)})
    return folder, root / "adapters"


def adapter_flop_fraction(folder: Path, names: list[str], traffic: list[str]) -> float:
    """LoRA multiply-adds per token over the base's (its linear layers and head), averaged over the traffic."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = hidden // config.num_attention_heads * config.num_key_value_heads
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    base = layers * sum(i * o for i, o in shapes.values()) + hidden * config.vocab_size
    per_adapter = {}
    for index, name in enumerate(names):
        spec = adapter_spec(index)
        per_adapter[name] = layers * sum(spec["r"] * sum(shapes[target]) for target in spec["target_modules"])
    return statistics.mean(per_adapter[name] for name in traffic) / base


def make_traffic(requests: int, rate: float, names: list[str], min_tokens: int, max_tokens: int, zipf: float, seed: int, words: list[str]):
    rng = random.Random(seed)
    adapters = zipf_models(names, requests, zipf, seed)
    traffic, clock = [], 0.0
    for adapter in adapters:
        clock += rng.expovariate(rate)
        length = int(round(math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens)))))
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(8, 32)))
        traffic.append({"at": clock, "adapter": adapter, "prompt": prompt, "max_tokens": length})
    return traffic


async def _drive(traffic: list[dict], one) -> tuple[list[dict], float]:
    """Start ``one(item)`` at each item's arrival time; returns the records and the run's seconds."""
    start = time.perf_counter()

    async def arrive(item):
        await asyncio.sleep(max(0.0, item["at"] - (time.perf_counter() - start)))
        arrived = time.perf_counter()
        record = await one(item)
        record["ttft"] = record["first"] - arrived
        return record

    records = await asyncio.gather(*(arrive(item) for item in traffic))
    return list(records), time.perf_counter() - start


async def _token_engine_run(service, traffic: list[dict], base_only: bool):
    from ..serve.engine import TextRequest

    async def one(item):
        request = TextRequest(
            service.encode_prompt(item["prompt"]), adapter=None if base_only else item["adapter"],
            max_tokens=item["max_tokens"], temperature=0.0,
        )
        times, tokens = [], 0
        async for event in service.stream(request):
            now = time.perf_counter()
            new = event.completion_tokens - tokens
            times.extend([now] * max(new, 0))
            tokens = event.completion_tokens
        return {"first": times[0] if times else time.perf_counter(), "times": times, "tokens": tokens}

    return await _drive(traffic, one)


async def _request_engine_run(engine, traffic: list[dict], max_batch: int):
    from ..serve.batcher import Batcher
    from ..serve.model import CompletionRow

    batcher = Batcher(engine.complete, max_batch)

    async def one(item):
        result = await batcher.submit(CompletionRow(item["adapter"], item["prompt"], item["max_tokens"], 0.0))
        now = time.perf_counter()
        return {"first": now, "times": [], "tokens": result.completion_tokens}

    return await _drive(traffic, one)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(engine: str, records: list[dict], seconds: float, recompiles: int) -> dict:
    gaps = [after - before for record in records for before, after in zip(record["times"], record["times"][1:])]
    tokens = sum(record["tokens"] for record in records)
    ttft = [record["ttft"] for record in records]
    return {
        "engine": engine, "requests": len(records), "output_tokens": tokens, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "ttft_p50_ms": 1000 * _percentile(ttft, 0.5), "ttft_p99_ms": 1000 * _percentile(ttft, 0.99),
        "itl_p50_ms": 1000 * _percentile(gaps, 0.5), "itl_p99_ms": 1000 * _percentile(gaps, 0.99), "recompiles": recompiles,
    }


def run_serve_bench(
    requests: int = 64,
    rate: float = 1.0,
    adapters: int = 50,
    min_tokens: int = 4,
    max_tokens: int = 256,
    max_batch: int = 8,
    slots: int = 8,
    hidden: int = 512,
    layers: int = 4,
    vocab: int = 2048,
    zipf: float = 1.1,
    backend: str = "inductor",
    threads: int = 0,
    engines: tuple[str, ...] = ENGINES,
    quick: bool = False,
    seed: int = 0,
) -> dict:
    """Run the traffic through each engine in ``engines``; ``quick``: a smoke run of seconds (tiny model, nothing
    compiled: ``backend="none"`` runs the engines eager)."""
    from ..compile_guard import CompileCounter
    from ..serve.model import PeftTextEngine, TextEngine, served_adapters
    from ..serve.text import TextService
    from ..testing.synthetic import WORDS

    if quick:
        requests, rate, adapters, min_tokens, max_tokens, hidden, layers, vocab, backend = 6, 20.0, 4, 2, 8, 64, 1, 96, "none"
    if threads:
        torch.set_num_threads(threads)
    root = Path(tempfile.mkdtemp(prefix="loraswap-bench-serve-"))
    folder, adapter_dir = write_bench_models(root, adapters, hidden, layers, vocab)
    named = served_adapters(adapter_dir)
    names = sorted(named)
    words = [*WORDS, *(f"w{index}" for index in range(vocab - len(WORDS) - 4))]
    traffic = make_traffic(requests, rate, names, min_tokens, max_tokens, zipf, seed, words)
    max_model_len = 32 + 8 + max_tokens  # the longest prompt (with its special tokens) and answer
    rows = []
    for engine in engines:
        if engine in ("tokens", "tokens-base"):
            service = TextService(
                folder, named, slots=slots, max_batch=max_batch, max_model_len=max_model_len, backend=backend,
                attach=engine == "tokens", max_prompt_len=40,
            )
            service.warm_up()
            records, seconds = asyncio.run(_token_engine_run(service, traffic, base_only=engine == "tokens-base"))
            service.close()
            recompiles = service.stats()["recompiles"]
        else:
            if engine == "request":
                model = TextEngine(folder, named, slots=slots, max_batch=max_batch, backend=backend)
            else:
                model = PeftTextEngine(folder, named, slots=slots, max_batch=max_batch)
            model.warm_up()
            with CompileCounter() as counter:
                records, seconds = asyncio.run(_request_engine_run(model, traffic, max_batch))
            recompiles = counter.graphs
        rows.append(_summary(engine, records, seconds, recompiles))
    config = dict(
        requests=requests, rate=rate, adapters=adapters, min_tokens=min_tokens, max_tokens=max_tokens, max_batch=max_batch,
        slots=slots, hidden=hidden, layers=layers, vocab=vocab, zipf=zipf, backend=backend, quick=quick,
    )
    by_engine = {row["engine"]: row for row in rows}
    ratios = {}
    tokens = by_engine.get("tokens")
    if tokens:
        for other, key in (("request", "vs_request"), ("peft", "vs_peft"), ("tokens-base", "vs_base")):
            if other in by_engine:
                ratios[f"tokens_per_s_{key}"] = tokens["tokens_per_s"] / by_engine[other]["tokens_per_s"]
        if "request" in by_engine:
            ratios["ttft_p99_vs_request"] = tokens["ttft_p99_ms"] / by_engine["request"]["ttft_p99_ms"]
    return {"config": config, "rows": rows, "ratios": ratios, "adapter_flop_fraction": adapter_flop_fraction(folder, names, [t["adapter"] for t in traffic])}


def print_serve(result: dict) -> None:
    from rich.console import Console

    from .report import print_table

    columns = ("engine", "requests", "output tokens", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "recompiles")

    def ms(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.0f}" if value >= 10 else f"{value:.1f}"

    rows = [
        (row["engine"], row["requests"], row["output_tokens"], f"{row['tokens_per_s']:.1f}", ms(row["ttft_p50_ms"]),
         ms(row["ttft_p99_ms"]), ms(row["itl_p50_ms"]), ms(row["itl_p99_ms"]), row["recompiles"])
        for row in result["rows"]
    ]
    console = Console()
    print_table(f"bench serve: {result['config']}", columns, rows, console)
    ratios = result["ratios"]
    targets = {
        "tokens_per_s_vs_request": ">= 2x", "tokens_per_s_vs_peft": ">= 3x", "tokens_per_s_vs_base": ">= 0.9x",
        "ttft_p99_vs_request": "<= 0.25x",
    }
    for key, value in ratios.items():
        console.print(f"{key}: {value:.2f}x (target {targets[key]})")
    console.print(f"adapters' FLOPs per token over the base's (traffic mean): {100 * result['adapter_flop_fraction']:.1f}% (target <= 5%)")
