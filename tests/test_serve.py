"""``loraswap serve`` on a local Ray instance: two replicas of a tiny Llama (chat template on its tokenizer) with 5
adapters, checked against PEFT for completions and chat, streamed and not; one replica of a tiny GPT-2 without a
chat template (token-level batching in one replica, 400s); one replica of a tiny SD pipeline with 3 LoRA files,
checked against diffusers.

One Ray instance for the module (starting Ray costs tens of seconds on 2 cores), stopped at teardown.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from loraswap.testing.synthetic import (
    peft_reference,
    tiny_llama_folder,
    write_adapters,
    write_dora_adapter,
    write_peft_adapter,
)
from loraswap.testing.synthetic_text import peft_greedy, tiny_causal_lm_folder
from loraswap.serve.ray_local import start_local_ray, stop_ray
from loraswap.testing.synthetic_diffusers import LoraSpec, tiny_sd_pipeline, write_diffusers_lora

pytestmark = pytest.mark.ray

ADAPTERS = {
    f"task-{index}": dict(r=2 + 2 * index, lora_alpha=128, target_modules=targets)
    for index, targets in enumerate(
        [["q_proj", "v_proj"], ["gate_proj", "down_proj"], ["o_proj", "up_proj"], ["k_proj", "v_proj"], ["q_proj", "down_proj"]]
    )
}
PROMPTS = ["the cat sat on", "hello world", "a dog ran under the tree", "w5 w6", "the mat", "up", "warm tree w9", "cat"]
NEW_TOKENS = 6
REPLICAS = 2
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def llama_served(tmp_path_factory):
    """A tiny Llama folder (tokenizer saved with it) and its adapter folder: 5 adapters and one DoRA one (served)."""
    root = tmp_path_factory.mktemp("serve-llama")
    folder = tiny_causal_lm_folder(root / "tiny-llama", "llama")  # tiny_llama_folder's model, with a chat template
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    adapters = write_adapters(base, root / "adapters", ADAPTERS)
    adapters["dora"] = write_dora_adapter(
        base, root / "adapters" / "dora", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]
    )
    return folder, root / "adapters", base, adapters


@pytest.fixture(scope="module")
def ray_instance():
    start_local_ray()
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_ray()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def text_url(ray_instance, llama_served):
    from ray import serve

    from loraswap.serve import build_app

    folder, adapter_dir, _, _ = llama_served
    app = build_app(folder, adapter_dir, replicas=REPLICAS, slots=3, max_batch=8, max_model_len=MAX_MODEL_LEN, backend="eager")
    serve.run(app, name="text", route_prefix="/text")
    return f"{ray_instance}/text"


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url, json=body, timeout=120)


def _peft_greedy(base, adapter_path, prompt: str, tokenizer) -> str:
    model = base if adapter_path is None else peft_reference(base, adapter_path)
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :].tolist(), skip_special_tokens=True)


def test_completions_equal_peft_greedy_for_every_adapter_and_the_base(text_url, llama_served):
    from transformers import AutoTokenizer

    folder, _, base, adapters = llama_served
    tokenizer = AutoTokenizer.from_pretrained(folder)
    models = [folder.name, *ADAPTERS, "dora", folder.name]  # 8 requests in flight at once
    bodies = [
        {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0} for model, prompt in zip(models, PROMPTS)
    ]
    expected = [_peft_greedy(base, adapters.get(body["model"]), body["prompt"], tokenizer) for body in bodies]
    for _ in range(2):  # the second round finds adapters resident (or evicted) where the first left them
        with ThreadPoolExecutor(len(bodies)) as clients:
            responses = list(clients.map(lambda body: _post(f"{text_url}/v1/completions", body), bodies))
        for body, response, text in zip(bodies, responses, expected):
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == text, body
    for body, text in zip(bodies, expected):  # guards against adapters too weak to change a greedy token
        if body["model"] != folder.name:
            assert text != _peft_greedy(base, None, body["prompt"], tokenizer), body


def test_models_lists_the_base_then_every_adapter(text_url, llama_served):
    folder = llama_served[0]
    listed = httpx.get(f"{text_url}/v1/models", timeout=30).json()
    assert listed["object"] == "list"
    assert [entry["id"] for entry in listed["data"]] == [folder.name, *sorted([*ADAPTERS, "dora"])]
    assert {entry["parent"] for entry in listed["data"][1:]} == {folder.name}


def test_stats_every_replica_no_recompile_after_warm_up(text_url, llama_served):
    _post(f"{text_url}/v1/completions", {"model": "task-1", "prompt": "the cat", "max_tokens": 2, "temperature": 0})
    replicas = httpx.get(f"{text_url}/v1/stats", timeout=30).json()["replicas"]
    assert len(replicas) == REPLICAS
    for replica in replicas:
        assert set(replica) == {"replica", "recompiles", "slot_loads", "host_hits", "requests", "batches"}
        assert replica["recompiles"] == 0
    assert sum(replica["requests"] for replica in replicas) >= 1


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "no-such-adapter", "prompt": "the cat"}, 404, "model"),
        ({"model": "task-0", "prompt": "the cat", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "the cat"}, 400, "model"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(text_url, body, status, param):
    response = _post(f"{text_url}/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert "ray::" not in error["message"]  # the error's own message, not the replica's traceback
    after = _post(f"{text_url}/v1/completions", {"model": "task-2", "prompt": "the cat", "max_tokens": 2, "temperature": 0})
    assert after.status_code == 200 and len(after.json()["choices"]) == 1


def _stream(url: str, body: dict) -> list[dict | str]:
    """The data of every server-sent event of a streamed answer (``"[DONE]"`` as a string)."""
    events = []
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_equals_peft_greedy_with_the_chat_template_and_streams_concatenate(text_url, llama_served):
    """Chat for an adapter, the base and BASE:ADAPTER equals PEFT's greedy generate on the templated prompt; a
    streamed chat and a streamed completion concatenate to the non-streamed answers; include_usage adds usage."""
    from transformers import AutoTokenizer

    folder, _, base, adapters = llama_served
    tokenizer = AutoTokenizer.from_pretrained(folder)
    models = ["task-1", folder.name, f"{folder.name}:task-3"]
    for model, content in zip(models, ["the cat sat on", "hello world", "a dog ran under the tree"]):
        adapter = None if model == folder.name else model.rsplit(":", 1)[-1]
        expected = peft_greedy(base, adapters.get(adapter), _chat_ids(tokenizer, content), NEW_TOKENS)
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_completion_tokens": NEW_TOKENS, "temperature": 0}
        answer = _post(f"{text_url}/v1/chat/completions", body).json()
        assert answer["model"] == model and answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"] == tokenizer.decode(expected, skip_special_tokens=True), model
        assert answer["usage"]["completion_tokens"] == len(expected)
        events = _stream(f"{text_url}/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"] == answer["usage"]
        chunks = events[:-2]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answer["choices"][0]["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]
        words = answer["choices"][0]["message"]["content"].split()  # one word per token of the tiny tokenizer
        assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) == len(words)  # a piece per token
    completion = {"model": "task-0", "prompt": "the cat sat on", "max_tokens": NEW_TOKENS, "temperature": 0}
    text = _post(f"{text_url}/v1/completions", completion).json()["choices"][0]["text"]
    events = _stream(f"{text_url}/v1/completions", completion)
    assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) == text
    assert {e["object"] for e in events[:-1]} == {"text_completion"}
    assert len([e for e in events[:-1] if e["choices"][0]["text"]]) == len(text.split()) >= 3


def test_lora_scale_equals_peft_with_the_scaling_multiplied(text_url, llama_served):
    from transformers import AutoTokenizer

    folder, _, base, adapters = llama_served
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = "the cat sat on"
    for scale in (0.5, 1.0):
        body = {"model": "task-2", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "lora_scale": scale}
        expected = peft_greedy(base, adapters["task-2"], tokenizer(prompt)["input_ids"], NEW_TOKENS, scale=scale)
        assert _post(f"{text_url}/v1/completions", body).json()["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert peft_greedy(base, adapters["task-2"], tokenizer(prompt)["input_ids"], NEW_TOKENS, scale=0.5) != expected


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "the cat", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
        ({"prompt": "the cat", "n": 2}, "n"),
        ({"prompt": "the cat", "logprobs": 2}, "logprobs"),
        ({"messages": [{"role": "user", "content": "the cat"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "the cat"}], "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "user", "content": "the cat"}], "max_tokens": MAX_MODEL_LEN, "stream": True}, "max_tokens"),
    ],
)
def test_unserved_fields_and_too_long_requests_get_400s_naming_them(text_url, body, param):
    endpoint = "chat/completions" if "messages" in body else "completions"
    response = _post(f"{text_url}/v1/{endpoint}", {"model": "task-0", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "ray::" not in error["message"] and "Traceback" not in error["message"]
    if param == "max_tokens":
        assert f"max_model_len of {MAX_MODEL_LEN}" in error["message"]


GPT2_LEN = 128


@pytest.fixture(scope="module")
def gpt2_url(ray_instance, tmp_path_factory):
    """One replica of a tiny GPT-2 (Conv1D layers) whose tokenizer has no chat template, and one adapter."""
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraswap.serve import build_app

    root = tmp_path_factory.mktemp("serve-gpt2")
    folder = tiny_causal_lm_folder(root / "tiny-gpt2", "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    write_adapters(base, root / "adapters", {"fc": dict(r=4, lora_alpha=64, target_modules=["c_fc"])})
    app = build_app(folder, root / "adapters", replicas=1, slots=1, max_batch=4, max_model_len=GPT2_LEN, backend="eager")
    serve.run(app, name="gpt2", route_prefix="/gpt2")
    return f"{ray_instance}/gpt2", folder, base, tokenizer


def test_a_short_request_joins_while_a_long_one_decodes_and_chat_without_template_is_400(gpt2_url):
    """One replica: a short request sent while a long one streams finishes while the long one still has most of
    its tokens to go (it joined the running batch); the long one's answer is still PEFT's; a client that goes away
    mid-stream frees its row (its request counts as cancelled, no request runs after)."""
    import threading
    import time

    url, folder, base, tokenizer = gpt2_url
    prompt = next(p for p in PROMPTS if len(peft_greedy(base, None, tokenizer(p)["input_ids"], 100)) == 100)  # no early eos
    long_body = {"model": folder.name, "prompt": prompt, "max_tokens": 100, "temperature": 0}
    arrivals: list[float] = []
    done = {}

    def stream_long() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={**long_body, "stream": True}, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter())
        done["long"] = time.perf_counter()

    long_thread = threading.Thread(target=stream_long)
    long_thread.start()
    while len(arrivals) < 5:
        time.sleep(0.01)
    short = _post(f"{url}/v1/completions", {"model": "fc", "prompt": "hello world", "max_tokens": 2, "temperature": 0})
    done["short"] = time.perf_counter()
    long_thread.join()
    assert short.status_code == 200
    assert sum(arrival > done["short"] for arrival in arrivals) >= 50  # the long one had at least half to go
    expected = tokenizer.decode(peft_greedy(base, None, tokenizer(prompt)["input_ids"], 100), skip_special_tokens=True)
    assert _post(f"{url}/v1/completions", long_body).json()["choices"][0]["text"] == expected
    with httpx.stream("POST", f"{url}/v1/completions", json={**long_body, "stream": True}, timeout=120) as response:
        next(line for line in response.iter_lines() if line.startswith("data: {"))  # the client goes away mid-answer
    deadline = time.perf_counter() + 30
    while 'loraswap_requests_total{finish_reason="cancelled"' not in (metrics := httpx.get(f"{url}/metrics", timeout=30).text):
        assert time.perf_counter() < deadline, "the disconnected request was never cancelled"
        time.sleep(0.2)
    assert [line for line in metrics.splitlines() if line.startswith("loraswap_running_requests")][0].endswith(" 0.0")
    chat = _post(f"{url}/v1/chat/completions", {"model": "fc", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    assert "chat template" in chat.json()["error"]["message"]
    stats = httpx.get(f"{url}/v1/stats", timeout=30).json()["replicas"]
    assert [replica["recompiles"] for replica in stats] == [0]


def test_metrics_are_prometheus_text_with_every_replica(text_url):
    _post(f"{text_url}/v1/completions", {"model": "task-1", "prompt": "the cat", "max_tokens": 3, "temperature": 0})
    text = httpx.get(f"{text_url}/metrics", timeout=30).text
    for name in (
        "loraswap_requests_total", "loraswap_generation_tokens_total", "loraswap_time_to_first_token_seconds_bucket",
        "loraswap_inter_token_latency_seconds_count", "loraswap_adapter_loads_total", "loraswap_recompiles_total",
    ):
        assert name in text, name
    recompiles = [line for line in text.splitlines() if line.startswith("loraswap_recompiles_total")]
    assert len(recompiles) >= REPLICAS and all(line.endswith(" 0.0") for line in recompiles)


def test_nothing_listens_beyond_loopback(text_url):
    """Every listening TCP socket of this process and its descendants (Ray, the proxy, replicas) is on loopback."""
    ours = {os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))}
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    checked = []
    for line in listening:
        pids = {int(part.split("=")[1]) for part in line.replace(",", " ").split() if part.startswith("pid=")}
        if pids & ours:
            local = line.split()[3]
            checked.append(local)
            assert local.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"), line
    assert len(checked) >= 2 * REPLICAS, checked  # the test saw the replicas' sockets, not an empty list


IMAGE_LORAS = {
    "style-a": LoraSpec(targets={"unet": ["to_v", "to_out.0"]}, rank=8, alpha=4, seed=1),
    "style-b": LoraSpec(targets={"unet": ["to_k"], "text_encoder": ["k_proj", "fc2"]}, rank=2, alpha=3, seed=2),
    "style-c": LoraSpec(targets={"text_encoder": ["v_proj", "fc1"]}, rank=6, alpha=6, seed=4),
}
IMAGE_SETTINGS = {"size": "32x32", "num_inference_steps": 2, "guidance_scale": 7.5}


@pytest.fixture(scope="module")
def sd_served(tmp_path_factory):
    """A tiny SD pipeline folder and a folder of 3 LoRA files (diffusers format) named by file."""
    root = tmp_path_factory.mktemp("serve-sd")
    tiny_sd_pipeline().save_pretrained(root / "tiny-sd")
    pipe = tiny_sd_pipeline()
    (root / "loras").mkdir()
    for name, spec in IMAGE_LORAS.items():
        written = write_diffusers_lora(pipe, root / "written" / name, spec)
        shutil.move(written, root / "loras" / f"{name}.safetensors")
    return root / "tiny-sd", root / "loras"


@pytest.fixture(scope="module")
def images_url(ray_instance, sd_served):
    from ray import serve

    from loraswap.serve import build_app

    serve.run(build_app(*sd_served, replicas=1, slots=2, backend="eager", sizes=["32x32"]), name="images", route_prefix="/images")
    return f"{ray_instance}/images"


def _diffusers_image(folder, lora_file, prompt: str, seed: int) -> np.ndarray:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if lora_file is not None:
        pipe.load_lora_weights(lora_file)
    image = pipe(
        prompt, height=32, width=32, num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(seed)
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_images_equal_diffusers_with_load_lora_weights(images_url, sd_served):
    """Concurrent requests on different LoRAs (per-prompt routing in one call) equal diffusers' own pipeline."""
    folder, loras = sd_served
    bodies = [
        {"model": model, "prompt": prompt, "seed": seed, "response_format": "b64_json", **IMAGE_SETTINGS}
        for model, prompt, seed in [("style-a", "a cat", 3), (folder.name, "a dog", 4), ("style-c", "a tree", 5), ("style-b", "a cat", 6)]
    ]
    with ThreadPoolExecutor(len(bodies)) as clients:
        responses = list(clients.map(lambda body: _post(f"{images_url}/v1/images/generations", body), bodies))
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))), dtype=np.int16)
        lora = None if body["model"] == folder.name else loras / f"{body['model']}.safetensors"
        expected = _diffusers_image(folder, lora, body["prompt"], body["seed"])
        assert np.abs(served - expected).max() <= 1, body["model"]
        if lora is not None:  # guards against a LoRA too weak to change the image
            assert np.abs(_diffusers_image(folder, None, body["prompt"], body["seed"]) - expected).max() > 4
    stats = httpx.get(f"{images_url}/v1/stats", timeout=30).json()["replicas"]
    assert [replica["recompiles"] for replica in stats] == [0]
    unserved = _post(f"{images_url}/v1/images/generations", {"model": "style-a", "prompt": "a cat", "size": "48x48"})
    message = unserved.json()["error"]["message"]
    assert unserved.status_code == 400 and "48x48" in message and "Traceback" not in message and "ray::" not in message



def test_a_warmed_up_text_engine_serves_every_batch_size_without_recompiling(tmp_path):
    """In-process, no Ray: after warm-up, batches of 1 to 8 rows with prompts of every length compile nothing,
    and per-adapter batches answer as the mixed one does (warmed up in per-adapter mode: its warm-up once split
    the batch of 3 into batches of 2, and the first 3 rows of one adapter recompiled). dynamo makes a size dynamic only when it sees a second value (and at hidden 128 the warm-up's batch of 2
    shares its size with the KV heads), so warm-up must show it one, as `bench serve` found."""
    from transformers import AutoModelForCausalLM

    from loraswap.serve.model import CompletionRow, TextEngine

    folder = tiny_llama_folder(tmp_path / "tiny-llama", hidden=128)
    specs = dict(list(ADAPTERS.items())[:3])
    adapters = write_adapters(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapters", specs)
    engine = TextEngine(
        folder, {name: str(path) for name, path in adapters.items()}, slots=3, backend="eager", mixed=False
    )
    engine.warm_up()  # as bench serve's per-adapter mode warms up: one generate() per adapter
    names = list(adapters)
    for rows in (3, 5):  # one adapter's rows: batches of those sizes
        engine.complete([CompletionRow(names[0], PROMPTS[i], max_tokens=4) for i in range(rows)])
    engine.mixed = True
    for rows in (1, 5, 8, 2, 7):
        engine.complete([CompletionRow(names[i % 3], PROMPTS[(rows + i) % len(PROMPTS)], max_tokens=4) for i in range(rows)])
    mixed = [CompletionRow([*names, None][i % 4], PROMPTS[i], max_tokens=4) for i in range(8)]
    routed = engine.complete(mixed)
    engine.mixed = False  # bench serve's per-adapter mode: one generate() per adapter, same answers
    assert engine.complete(mixed) == routed
    assert engine.stats()["recompiles"] == 0


def test_batcher_batches_what_waits_while_the_engine_is_busy_whatever_the_adapters():
    """No Ray: requests that arrive together form one batch (up to max_batch); an error reaches its batch only."""
    import asyncio

    from loraswap.serve.batcher import Batcher

    seen: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        seen.append(items)
        if "bad" in items:
            raise ValueError("bad row")
        return [item.upper() for item in items]

    async def scenario():
        batcher = Batcher(run, max_batch=3)
        first = await asyncio.gather(*(batcher.submit(item) for item in ["a", "b", "c", "d"]))
        second = await asyncio.gather(batcher.submit("bad"), batcher.submit("e"), return_exceptions=True)
        third = await batcher.submit("f")
        return batcher.batches, first, second, third

    batches, first, second, third = asyncio.run(scenario())
    assert seen == [["a", "b", "c"], ["d"], ["bad", "e"], ["f"]] and batches == 4
    assert first == ["A", "B", "C", "D"] and third == "F"
    assert [type(result) for result in second] == [ValueError, ValueError]
