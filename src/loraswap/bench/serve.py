"""``loraswap bench serve``: the same Ray Serve app with loraswap and with PEFT inside the replicas.

A random-init Llama folder and 30 PEFT adapters are written to a temporary folder; one local Ray instance
(loopback only) serves them, first with loraswap's engine (compiled, routed batches, adapter pool),
then with PEFT's (eager, ``load_adapter``/``set_adapter``, one adapter per batch); with ``per_adapter``
also with loraswap's engine splitting each batch by adapter as PEFT must. All see the same
back-to-back Zipf traffic from concurrent clients (one keep-alive connection each), bounded in count and in time.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path



def zipf_models(names: list[str], count: int, exponent: float, seed: int) -> list[str]:
    """``count`` adapter names drawn with probability proportional to ``1 / rank**exponent``."""
    weights = [1.0 / (rank + 1) ** exponent for rank in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=count)


def write_bench_models(root: Path, adapters: int, hidden: int, layers: int) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM

    from ..testing.synthetic import tiny_llama_folder, write_adapters

    folder = tiny_llama_folder(root / "bench-llama", hidden=hidden, layers=layers)
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    projections = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]]
    specs = {
        f"adapter-{index:02d}": dict(r=(4, 8, 16)[index % 3], lora_alpha=16, target_modules=projections[index % 3])
        for index in range(adapters)
    }
    write_adapters(base, root / "adapters", specs)
    return folder, root / "adapters"


def drive(url: str, models: list[str], clients: int, max_tokens: int, time_limit: float) -> dict:
    """Send one completion per entry of ``models`` from ``clients`` threads, back to back; stop at ``time_limit``."""
    import httpx

    deadline = time.perf_counter() + time_limit
    latencies: list[float] = []
    failures = 0

    def one(model: str) -> None:
        nonlocal failures
        if time.perf_counter() > deadline:
            return
        start = time.perf_counter()
        response = client.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": "the cat sat on the mat", "max_tokens": max_tokens, "temperature": 0},
            timeout=120,
        )
        if response.status_code == 200:
            latencies.append(time.perf_counter() - start)
        else:
            failures += 1

    start = time.perf_counter()
    with httpx.Client(limits=httpx.Limits(max_connections=clients)) as client, ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, models))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "failures": failures,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def run_serve_bench(
    requests: int = 200,
    adapters: int = 30,
    clients: int = 8,
    replicas: int = 2,
    slots: int = 4,
    max_tokens: int = 16,
    hidden: int = 256,
    layers: int = 4,
    backend: str = "inductor",
    time_limit: float = 120.0,
    exponent: float = 1.1,
    per_adapter: bool = False,
) -> dict:
    from ray import serve

    from ..serve.app import build_app
    from ..serve.ray_local import start_local_ray, stop_ray

    root = Path(tempfile.mkdtemp(prefix="loraswap-bench-serve-"))
    folder, adapter_dir = write_bench_models(root, adapters, hidden, layers)
    names = sorted(path.name for path in adapter_dir.iterdir())
    models = zipf_models(names, requests, exponent, seed=0)
    start_local_ray()
    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    engines = ["loraswap", *(["loraswap-per-adapter"] if per_adapter else []), "peft"]
    rows = []
    try:
        for engine in engines:
            app = build_app(folder, adapter_dir, replicas=replicas, slots=slots, backend=backend, engine=engine)
            serve.run(app, name=engine, route_prefix="/")  # returns once every replica warmed up (compiled)
            drive(url, models[: 2 * clients], clients, max_tokens, time_limit)  # first requests: connections, caches
            row = drive(url, models, clients, max_tokens, time_limit)
            stats = _get(f"{url}/v1/stats")["replicas"]
            served = sum(replica["requests"] for replica in stats)
            row.update(
                engine=engine,
                adapter_loads_per_request=sum(replica["slot_loads"] for replica in stats) / max(served, 1),
                requests_per_batch=served / max(sum(replica["batches"] for replica in stats), 1),
                recompiles=sum(replica["recompiles"] for replica in stats),
            )
            rows.append(row)
            serve.delete(engine)
    finally:
        stop_ray()
    config = dict(
        requests=requests, adapters=adapters, clients=clients, replicas=replicas, slots=slots,
        max_tokens=max_tokens, hidden=hidden, layers=layers, backend=backend, zipf_exponent=exponent,
    )
    loraswap, peft = rows[0], rows[-1]
    return {
        "config": config,
        "rows": rows,
        "throughput_ratio": loraswap["requests_per_s"] / peft["requests_per_s"],
        "p99_ratio": loraswap["p99_ms"] / peft["p99_ms"],
    }


def _get(url: str) -> dict:
    import httpx

    return httpx.get(url, timeout=30).json()


def print_serve(result: dict) -> None:
    from rich.console import Console

    from .report import print_table

    columns = (
        "engine", "requests", "failures", "requests/s", "p50 ms", "p99 ms", "adapter loads/request", "requests/batch",
        "recompiles",
    )
    rows = [
        (
            row["engine"], row["requests"], row["failures"], f"{row['requests_per_s']:.2f}", f"{row['p50_ms']:.0f}",
            f"{row['p99_ms']:.0f}", f"{row['adapter_loads_per_request']:.2f}", f"{row['requests_per_batch']:.2f}",
            row["recompiles"],
        )
        for row in result["rows"]
    ]
    console = Console()
    print_table(f"bench serve: {result['config']}", columns, rows, console)
    console.print(
        f"loraswap/PEFT requests/s: {result['throughput_ratio']:.2f}x (target >= 2x); "
        f"p99: {result['p99_ratio']:.2f}x (target <= 0.5x)"
    )
