"""What a replica runs for a causal LM: a :class:`~loraswap.serve.engine.TokenEngine` stepping in a background
thread, fed from the replica's event loop. No Ray here either (``bench serve`` and tests use it in-process).

Threads: requests are added from the event loop (``deque.append``; the engine thread alone pops them) and the
engine thread is woken through a condition; each step's events go back to the loop with
``call_soon_threadsafe``. torch releases the GIL inside ops, so the loop keeps answering HTTP while a step
runs. A stream whose consumer goes away (client disconnect, ``aclose``) cancels its sequence, which frees the
row at the next step. An exception in a step ends every request in the engine with that exception.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import torch

from ..errors import HotswapError
from .engine import Event, TextRequest, TokenEngine
from .metrics import EngineMetrics
from ..pool import AdapterPool

DEFAULT_MAX_MODEL_LEN = 2048  # the cap on the model config's context when --max-model-len is not given


class NoChatTemplateError(HotswapError, ValueError):
    """Chat asked of a tokenizer that has no chat template."""

    param = "messages"


def default_max_model_len(config, cap: int = DEFAULT_MAX_MODEL_LEN) -> int:
    """The model's own context (``max_position_embeddings`` or GPT-2's ``n_positions``), at most ``cap``: the KV
    cache holds ``max_batch`` rows of this many positions per layer."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or cap
    return min(int(context), cap)


class TextService:
    """A causal LM folder served with token-level batching: tokenization, the engine thread, metrics."""

    def __init__(
        self,
        folder: str | os.PathLike,
        adapters: Mapping[str, str],
        *,
        slots: int = 4,
        max_batch: int = 8,
        max_model_len: int | None = None,
        backend: str | None = "inductor",
        attach: bool = True,
        max_prompt_len: int | None = None,
    ) -> None:
        import loraswap
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .model import refused_adapters

        self.adapters = dict(adapters)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        self.refused: dict[str, HotswapError] = {}
        self.pool = None
        if attach:
            self.refused = refused_adapters(self.adapters, model)
            usable = [path for name, path in self.adapters.items() if name not in self.refused]
            capacity = loraswap.Capacity.for_adapters(usable, model=model, slots=slots, max_batch=max_batch, max_blend=1)
            self.pool = AdapterPool(loraswap.attach(model, capacity), resolve=self.adapters.__getitem__)
        max_model_len = max_model_len or default_max_model_len(model.config)
        self.engine = TokenEngine(
            model, self.tokenizer, self.pool, max_batch=max_batch, max_model_len=max_model_len, backend=backend,
            max_prompt_len=max_prompt_len,
        )
        self.metrics = EngineMetrics()
        self._compiles = loraswap.CompileCounter()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- requests ----------------------------------------------------------------------------------

    def validate(self, adapter: str) -> None:
        """Read, validate and pad ``adapter`` into the host cache; raises its :class:`HotswapError`."""
        if adapter in self.refused:
            raise self.refused[adapter]
        if self.pool is not None:
            self.pool.prefetch([adapter])[0].result()

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The tokenizer's chat template with the generation prompt; the template's text holds its special tokens."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise NoChatTemplateError(
                "this model's tokenizer has no chat template, so /v1/chat/completions cannot format messages; "
                "use /v1/completions, or save a tokenizer with a chat_template in the model folder"
            )
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def stream(self, request: TextRequest) -> AsyncIterator[Event]:
        """The request's events, as steps produce them; raises :class:`RequestTooLongError` before anything runs."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        sequence = self.engine.add(request, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        self._start()
        with self._wake:
            self._wake.notify()
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    self.metrics.finished(sequence)
                    return
        finally:
            if sequence.finish_reason is None:
                self.engine.cancel(sequence)
                self.metrics.request("cancelled")
                with self._wake:
                    self._wake.notify()

    # -- the engine thread -------------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loraswap-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closed or self.engine.busy)
                if self._closed:
                    return
            try:
                self.engine.step()
            except Exception as err:  # noqa: BLE001 - handed to every request in the engine
                for sequence in self.engine.abort():
                    sequence.on_event(err)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    # -- warm-up and figures -------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile every shape the engine uses (on an adapter when there is one), then count recompiles from zero."""
        adapter = next((name for name in self.adapters if name not in self.refused), None) if self.pool else None
        self.engine.warm_up(adapter)
        self._compiles.__enter__()

    def stats(self) -> dict[str, int]:
        pool = self.pool.stats if self.pool is not None else {"slot_loads": 0, "host_hits": 0}
        return {
            "recompiles": self._compiles.graphs, "slot_loads": pool["slot_loads"], "host_hits": pool["host_hits"],
            "requests": self.engine.requests,
        }

    def metric_families(self) -> list:
        stats = self.stats()
        self.metrics.sync(stats["slot_loads"], stats["recompiles"], self.engine.running)
        return self.metrics.families()
