"""The Ray Serve application: an OpenAI-style FastAPI ingress, N model replicas, one stats board.

Routing: the ingress sends a request for adapter ``a`` with ``multiplexed_model_id=a``, so Ray Serve
prefers a replica whose multiplexing cache holds ``a``; the base model goes to any replica. Inside a text
replica, requests join the token-level batch of its engine (:mod:`loraswap.serve.engine`) at the next step,
whatever their adapters; the replica's ``text`` method streams the engine's events back (a Ray streaming
call), and the ingress turns them into one JSON answer or server-sent events (:mod:`loraswap.serve.sse`). The
replica answers first with the prompt's token count, or with the request's error before anything runs, so a
refused request gets its 400 even when it asked to stream. Image replicas batch whole requests
(:mod:`loraswap.serve.batcher`).

Eviction from Ray's multiplexing cache is safe under concurrent requests because it frees nothing:
the cached "model" is the adapter's name, validated and packed into the host cache. Which adapters
sit in the slots is the :class:`~loraswap.AdapterPool`'s business, and it keeps every
adapter a running batch uses resident until that batch's forward is done.
"""


import asyncio
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import HotswapError
from .batcher import Batcher
from .engine import TextRequest
from .metrics import EngineMetrics, render
from .model import model_kind, resolve_model_folder, served_adapters
from .openai import (
    ChatRequest, CompletionRequest, ImageRequest, chat_response, completion_response, error_body, images_response,
    model_list, usage,
)
from .ray_local import configure_ray_env
from .sse import ChunkWriter, collect, sse_body
from .text import TextService

configure_ray_env()  # Ray reads its environment at import: this module is the one that imports it
from ray import serve  # noqa: E402

api = FastAPI(title="loraswap")


@api.exception_handler(RequestValidationError)
async def _malformed_body(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {}
    param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    return JSONResponse(error_body(400, f"malformed request body: {first.get('msg', err)}", param=param), status_code=400)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param), status_code=status)


def _refused(model: str, err: HotswapError) -> JSONResponse:
    """400 for a request loraswap refuses: an adapter that fails validation, an image size not compiled.

    Raised in a replica, ``err`` arrives as Ray's ``RayTaskError`` whose text is the replica's traceback;
    the client gets the message of the error itself (``err.cause``)."""
    cause = getattr(err, "cause", err)
    return _error(400, f"{model}: {cause}", getattr(cause, "param", "model"))


@serve.deployment(ray_actor_options={"num_cpus": 0})
class StatsBoard:
    """The latest figures each replica reported, so that ``/v1/stats`` and ``/metrics`` list idle replicas too."""

    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, int]] = {}
        self._metrics: dict[str, list] = {}

    def report(self, replica: str, stats: dict[str, int], metrics: list | None = None) -> None:
        self._replicas[replica] = stats
        if metrics is not None:
            self._metrics[replica] = metrics

    def snapshot(self) -> dict[str, list[dict[str, int]]]:
        return {"replicas": [{"replica": name, **self._replicas[name]} for name in sorted(self._replicas)]}

    def metrics(self) -> dict[str, list]:
        return dict(self._metrics)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Replica:
    """One compiled model with its adapter pool; warmed up (compiled) before Ray reports it ready.

    Text: a :class:`~loraswap.serve.text.TextService` (token-level batching); images: an
    :class:`~loraswap.serve.images.ImageEngine` behind a :class:`~loraswap.serve.batcher.Batcher`."""

    def __init__(self, folder: str, adapters: Mapping[str, str], board, options: Mapping[str, Any]) -> None:
        torch.set_num_threads(options["threads"])  # replicas share the machine's cores instead of oversubscribing them
        self.kind = options["kind"]
        if self.kind == "text":
            self.engine = TextService(
                folder, adapters, slots=options["slots"], max_batch=options["max_batch"],
                max_model_len=options["max_model_len"], backend=options["backend"],
            )
            self.metrics = self.engine.metrics
        else:
            from .images import ImageEngine

            self.engine = ImageEngine(folder, adapters, slots=options["slots"], sizes=options["sizes"], backend=options["backend"])
            self.batcher = Batcher(self.engine.generate, options["max_batch"], after_batch=self._report)
            self.metrics = EngineMetrics()
        self.engine.warm_up()
        self.board = board
        self.name = serve.get_replica_context().replica_id.unique_id
        self.resident = serve.multiplexed(max_num_models_per_replica=options["slots"])(self._validator())
        self._report()

    def _validator(self):
        """Ray's multiplexed loader (a plain function: Ray keeps its cache on it): the cached "model" is the
        adapter's name, once the adapter is read, validated and in the host cache."""
        engine = self.engine

        async def validated(adapter: str) -> str:
            await asyncio.to_thread(engine.validate, adapter)
            return adapter

        return validated

    def _report(self) -> None:
        """Send this replica's figures to the board without waiting (``/v1/stats`` may lag a request)."""
        if self.kind == "text":
            stats = {**self.engine.stats(), "batches": self.engine.engine.steps}
            self.board.report.remote(self.name, stats, self.engine.metric_families())
            return
        stats = {**self.engine.stats(), "batches": self.batcher.batches}
        self.metrics.sync(stats["slot_loads"], stats["recompiles"], 0)
        self.board.report.remote(self.name, stats, self.metrics.families())

    async def text(self, request: TextRequest, prompt: str | None, messages: list | None):
        """A streaming method: first the prompt's token count (or the request's error, before anything runs), then
        the engine's events. ``request.prompt_ids`` is filled here (the tokenizer lives with the model)."""
        adapter = serve.get_multiplexed_model_id() or None
        if adapter is not None:
            await self.resident(adapter)
        service = self.engine
        request.prompt_ids = service.encode_chat(messages) if messages is not None else service.encode_prompt(prompt)
        if request.max_tokens is None:  # chat without a limit: up to the end of the context
            request.max_tokens = max(1, service.engine.max_model_len - len(request.prompt_ids))
        events = service.stream(request)
        service.engine.check(request)
        try:
            yield len(request.prompt_ids)
            async for event in events:
                yield event
        finally:
            await events.aclose()
            self._report()

    async def images(self, request: ImageRequest) -> list[str]:
        adapter = serve.get_multiplexed_model_id() or None
        request = self.engine.with_size(request)
        if adapter is not None:
            await self.resident(adapter)
        images = await self.batcher.submit((adapter, request))
        self.metrics.request()
        return images


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """OpenAI-compatible endpoints; ``model`` picks the adapter: its name, the base's name, or ``BASE:ADAPTER``."""

    def __init__(self, replica, board, base: str, adapters: list[str], kind: str) -> None:
        self.replica = replica
        self.board = board
        self.base = base
        self.adapters = adapters
        self.kind = kind

    def _adapter_of(self, model: str) -> str | None:
        if model == self.base:
            return None
        base, sep, adapter = model.partition(":")
        return adapter if sep and base == self.base and adapter else model

    def _unknown(self, model: str, endpoint: str) -> JSONResponse | None:
        adapter = self._adapter_of(model)
        if adapter is not None and adapter not in self.adapters:
            return _error(404, f"The model `{model}` does not exist; GET /v1/models lists the {len(self.adapters) + 1} served", "model")
        wanted = "images" if endpoint == "images/generations" else "text"
        if self.kind != wanted:
            return _error(404, f"/v1/{endpoint} is not served: {self.base} is {'a text' if self.kind == 'text' else 'an image'} model", "model")
        return None

    def _handle(self, model: str):
        adapter = self._adapter_of(model)
        return self.replica if adapter is None else self.replica.options(multiplexed_model_id=adapter)

    @api.get("/v1/models")
    async def models(self) -> dict:
        return model_list(self.base, self.adapters)

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        return await self.board.snapshot.remote()

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return Response(render(await self.board.metrics.remote()), media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        prompts = body.prompts()
        if body.stream and len(prompts) != 1:
            return _error(400, f"stream: true takes one prompt, got {len(prompts)}; send one request per prompt", "prompt")
        return await self._text(body, [(prompt, None) for prompt in prompts], body.max_tokens, chat=False)

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest):
        messages = body.plain_messages()
        if isinstance(messages, str):
            return _error(400, messages, "messages")
        return await self._text(body, [(None, messages)], body.token_limit(), chat=True)

    async def _text(self, body, inputs: list, max_tokens: int | None, chat: bool):
        endpoint = "chat/completions" if chat else "completions"
        if (refused := self._unknown(body.model, endpoint)) is not None:
            return refused
        if (field := body.unsupported()) is not None:
            name, value = field
            return _error(400, f"{name}={value!r} is not served by loraswap's {endpoint} endpoint; leave it out", name)
        handle = self._handle(body.model).options(stream=True)
        streams, prompt_tokens = [], []
        try:
            for prompt, messages in inputs:
                request = TextRequest(
                    [], adapter=self._adapter_of(body.model), max_tokens=max_tokens, temperature=body.temperature,
                    top_p=body.top_p, seed=body.seed, stop=body.stops(), lora_scale=body.lora_scale,
                )
                stream = handle.text.remote(request, prompt, messages)
                streams.append(stream)
                prompt_tokens.append(await stream.__anext__())
        except HotswapError as err:
            for stream in streams:
                stream.cancel()
            return _refused(body.model, err)
        if body.stream:
            writer = ChunkWriter(chat, body.model, body.include_usage())
            return StreamingResponse(sse_body(streams[0], writer, prompt_tokens[0]), media_type="text/event-stream")
        collecting = []
        for stream in streams:  # a loop, not a generator expression: Ray pickles this class by value
            collecting.append(collect(stream))
        answers = await asyncio.gather(*collecting)
        counts = usage(sum(prompt_tokens), sum(tokens for _, _, tokens in answers))
        if chat:
            text, reason, _ = answers[0]
            return chat_response(body.model, text, reason, counts)
        return completion_response(body.model, [text for text, _, _ in answers], [reason for _, reason, _ in answers], counts)

    @api.post("/v1/images/generations")
    async def images(self, body: ImageRequest):
        if (refused := self._unknown(body.model, "images/generations")) is not None:
            return refused
        try:
            images = await self._handle(body.model).images.remote(body)
        except HotswapError as err:
            return _refused(body.model, err)
        return images_response(images)


def build_app(
    model: str | os.PathLike,
    adapters: str | os.PathLike,
    *,
    replicas: int = 2,
    slots: int = 4,
    max_batch: int = 8,
    max_model_len: int | None = None,
    backend: str = "inductor",
    sizes: Sequence[str] | None = None,
    threads: int | None = None,
):
    """The Ray Serve application serving MODEL with every adapter in the folder ``adapters``.

    ``max_batch``: rows of the token-level batch (text) or requests per pipeline call (images).
    ``max_model_len``: positions of a text row's KV cache (prompt + answer); by default the model's own context,
    capped at :data:`~loraswap.serve.text.DEFAULT_MAX_MODEL_LEN`. ``sizes``: the image sizes a pipeline serves
    (each compiled at warm-up); by default the one its ``__call__`` picks when given none.
    ``threads``: torch threads per replica; by default this machine's cores shared among the replicas (on a
    cluster, give the cores each replica gets).
    """
    folder = resolve_model_folder(model)
    kind = model_kind(folder)
    named = served_adapters(adapters)
    threads = threads or max(1, (os.cpu_count() or 1) // replicas)
    options = {
        "slots": slots, "max_batch": max_batch, "max_model_len": max_model_len, "backend": backend, "kind": kind,
        "sizes": tuple(sizes) if sizes else None, "threads": threads,
    }
    board = StatsBoard.bind()
    replica = Replica.options(num_replicas=replicas, max_ongoing_requests=16 * max_batch).bind(str(folder), named, board, options)
    return Ingress.options(max_ongoing_requests=64 * replicas).bind(replica, board, Path(model).name, list(named), kind)


def serve_forever(model: str, adapters: str, *, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Start a local Ray instance (loopback), run the app on ``host:port``, stay in the foreground until
    SIGTERM or Ctrl-C, then shut Serve and Ray down."""
    import signal
    import threading

    from .ray_local import start_local_ray, stop_ray

    app = build_app(model, adapters, **options)  # validates MODEL and DIR before Ray starts
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        start_local_ray()
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="loraswap", route_prefix="/")
        # After Ray's start, which puts in a SIGTERM handler of its own (raising SystemExit mid-call)
        for sig in previous:
            signal.signal(sig, lambda *_: stop.set())
        print(f"loraswap serve: ready at http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
        stop.wait()
    finally:
        # Ray's core worker also handles SIGTERM in C (absl's failure handler): it logs, chains to the Python handler
        # and arms a 3 s alarm that aborts the process, a watchdog for a crash that hangs. A shutdown longer than
        # that (an image pipeline's replicas took longer) ended in SIGABRT, exit 134: disarm it first.
        signal.alarm(0)
        print("loraswap serve: shutting down", flush=True)
        stop_ray()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
