"""The Ray Serve application: an OpenAI-style FastAPI ingress, N model replicas, one stats board.

Routing: the ingress sends a request for adapter ``a`` with ``multiplexed_model_id=a``, so Ray Serve
prefers a replica whose multiplexing cache holds ``a``; the base model goes to any replica. Inside a
replica, a :class:`~loraswap.serve.batcher.Batcher` gathers the rows of concurrent requests, whatever
their adapters, and the engine answers them with one routed forward per step (:mod:`loraswap.serve.model`).

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
from fastapi.responses import JSONResponse

from ..errors import HotswapError, ModeError
from .batcher import Batcher
from .model import TEXT_ENGINES, CompletionRow, model_kind, resolve_model_folder, served_adapters
from .openai import CompletionRequest, ImageRequest, completion_response, error_body, images_response, model_list
from .ray_local import configure_ray_env

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
    """The latest figures each replica reported, so that ``/v1/stats`` lists idle replicas too."""

    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, int]] = {}

    def report(self, replica: str, stats: dict[str, int]) -> None:
        self._replicas[replica] = stats

    def snapshot(self) -> dict[str, list[dict[str, int]]]:
        return {"replicas": [{"replica": name, **self._replicas[name]} for name in sorted(self._replicas)]}


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Replica:
    """One compiled model with its adapter pool; warmed up (compiled) before Ray reports it ready."""

    def __init__(self, folder: str, adapters: Mapping[str, str], board, options: Mapping[str, Any]) -> None:
        from .model import make_engine

        torch.set_num_threads(options["threads"])  # replicas share the machine's cores instead of oversubscribing them
        self.engine = make_engine(folder, adapters, options)
        self.engine.warm_up()
        self.board = board
        self.name = serve.get_replica_context().replica_id.unique_id
        self.batcher = Batcher(self._run_batch, options["max_batch"], after_batch=self._report)
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
        self.board.report.remote(self.name, {**self.engine.stats(), "batches": self.batcher.batches})

    def _run_batch(self, items: list[CompletionRow] | list[tuple[str | None, ImageRequest]]) -> list:
        """One batch of completion rows or of ``(adapter, image request)`` pairs, in the batcher's worker thread."""
        if isinstance(items[0], CompletionRow):
            return self.engine.complete(items)
        return self.engine.generate(items)

    async def complete(self, rows: list[CompletionRow]):
        adapter = serve.get_multiplexed_model_id() or None
        if adapter is not None:
            await self.resident(adapter)
        return await asyncio.gather(*(self.batcher.submit(row) for row in rows))

    async def images(self, request: ImageRequest) -> list[str]:
        adapter = serve.get_multiplexed_model_id() or None
        self.engine.check_size(request)
        if adapter is not None:
            await self.resident(adapter)
        return await self.batcher.submit((adapter, request))


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """OpenAI-compatible endpoints; ``model`` picks the adapter (the base under MODEL's folder name)."""

    def __init__(self, replica, board, base: str, adapters: list[str], kind: str) -> None:
        self.replica = replica
        self.board = board
        self.base = base
        self.adapters = adapters
        self.kind = kind

    def _adapter_of(self, model: str) -> str | None:
        return None if model == self.base else model

    def _unknown(self, model: str, endpoint: str) -> JSONResponse | None:
        if model != self.base and model not in self.adapters:
            return _error(404, f"The model `{model}` does not exist; GET /v1/models lists the {len(self.adapters) + 1} served", "model")
        wanted = "text" if endpoint == "completions" else "images"
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

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        if (refused := self._unknown(body.model, "completions")) is not None:
            return refused
        adapter = self._adapter_of(body.model)
        rows = [CompletionRow(adapter, prompt, body.max_tokens, body.temperature, body.seed) for prompt in body.prompts()]
        try:
            results = await self._handle(body.model).complete.remote(rows)
        except HotswapError as err:
            return _refused(body.model, err)
        usage = {
            "prompt_tokens": sum(result.prompt_tokens for result in results),
            "completion_tokens": sum(result.completion_tokens for result in results),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return completion_response(
            body.model, [result.text for result in results], [result.finish_reason for result in results], usage
        )

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
    backend: str = "inductor",
    engine: str = "loraswap",
    sizes: Sequence[str] = ("64x64",),
    threads: int | None = None,
):
    """The Ray Serve application serving MODEL with every adapter in the folder ``adapters``.

    ``engine="peft"`` serves the same endpoints with PEFT's eager model inside the replicas (the
    baseline of ``loraswap bench serve``); ``"loraswap-per-adapter"`` with loraswap's engine that splits
    each batch into one ``generate()`` per adapter, as PEFT must (to measure what mixed batches gain). ``sizes``: the image sizes a pipeline serves (each compiled at warm-up).
    ``threads``: torch threads per replica; by default this machine's cores shared among the replicas (on a
    cluster, give the cores each replica gets).
    """
    if engine not in TEXT_ENGINES:
        raise ModeError(f"engine {engine!r} is not one of {', '.join(TEXT_ENGINES)}; pick one of those")
    folder = resolve_model_folder(model)
    kind = model_kind(folder)
    named = served_adapters(adapters)
    threads = threads or max(1, (os.cpu_count() or 1) // replicas)
    options = {
        "slots": slots, "max_batch": max_batch, "backend": backend, "engine": engine, "kind": kind, "sizes": tuple(sizes),
        "threads": threads,
    }
    board = StatsBoard.bind()
    replica = Replica.options(num_replicas=replicas, max_ongoing_requests=4 * max_batch).bind(str(folder), named, board, options)
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
