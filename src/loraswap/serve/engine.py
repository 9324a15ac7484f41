"""Token-level (continuous) batching for a causal LM with loraswap slots: a plain object, no Ray, no threads.

What was chosen, and why:

- **Scheduler.** gpt-fast's shape: one compiled ``decode`` over a fixed ``[max_batch, 1]`` batch per step, and
  vLLM's iteration-level scheduling around it: between steps, finished rows leave (``max_tokens``, an
  end-of-sequence token, a ``stop`` string, a cancelled client) and waiting requests join (FCFS) in the rows
  they freed, each prefilled alone at once (one compiled forward per prompt bucket), so a short request never
  waits for a long one. A request joins only if the adapters of the running rows plus its own fit the pool's
  slots (a decode step routes every row through one routing table). transformers' own continuous batching
  (``generate_batch``, ``PagedAttentionCache``) packs prefill and decode tokens into one varlen forward over a
  paged cache; it needs its own attention kernels and a packed (per-token) routing that would have to follow
  every token's request, and its scheduler is built for offline batches; a fixed batch keeps loraswap's per-row
  routing (``pool.route([...])``, microseconds) exactly as it is, and is what CUDA graphs want.
- **KV cache.** Fixed buffers per layer (:mod:`loraswap.serve.kv_cache`), each row written at its own position
  with a per-row length mask; rows are reused at once, their stale entries hidden by the mask.
- **Shapes.** Decode is one shape. Prefill pads a prompt to a bucket (powers of two from 16, and
  the longest prompt allowed, ``max_prompt_len``) and compiles one graph per bucket; :meth:`TokenEngine.warm_up` runs every bucket and the
  decode step, so nothing that joins or leaves compiles afterwards. Each prefill bucket is its own compiled
  function (its own code object), so dynamo's recompile limit never applies.
- **Sampling** in the step (:mod:`loraswap.serve.sampling`): one token per row per step comes back to the host.
- **Text.** Incremental detokenization over a sliding window (as vLLM's), ``stop`` strings searched in the text
  so far, a suffix that could start a stop string held back: the pieces a request receives concatenate to its
  final text, whether it is streamed or not.

The old request-level engine (:mod:`loraswap.serve.model`) stays as ``bench serve``'s baseline.
"""

from __future__ import annotations

import itertools
import random
import time
import types
from collections import deque
from contextlib import nullcontext
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import HotswapError
from .kv_cache import DecodeCache, PrefillCache, RowBuffers, decode_mask, prefill_mask
from .sampling import sample


class RequestTooLongError(HotswapError, ValueError):
    """A prompt plus ``max_tokens`` beyond the engine's ``max_model_len``."""

    param = "max_tokens"


@dataclass
class TextRequest:
    """One generation: prompt token ids and how to continue them."""

    prompt_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    lora_scale: float = 1.0


@dataclass
class Event:
    """What a request receives after a step: a new piece of text (may be empty), its count, why it finished."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None


@dataclass
class Generation:
    """A request in the engine: its row, tokens, the text sent so far, timings. ``prefix_offset`` and
    ``read_offset`` are the detokenizer's window (see :meth:`TokenEngine._detokenize`)."""

    request: TextRequest
    on_event: Callable[[Event], None]
    seed: int
    row: int = -1
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` delivered
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)


def prefill_buckets(longest: int, smallest: int = 16) -> list[int]:
    """Prompt lengths that prefill compiles: powers of two from ``smallest`` below ``longest``, then ``longest``."""
    buckets = []
    length = smallest
    while length < longest:
        buckets.append(length)
        length *= 2
    return [*buckets, longest]


def _fresh_function(function: Callable) -> Callable:
    """A copy of ``function`` with its own code object, so that dynamo keeps a separate cache (and limit) for it."""
    code = function.__code__.replace(co_name=f"{function.__code__.co_name}_{next(_COPIES)}")
    return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)


_COPIES = itertools.count()


class TokenEngine:
    """Continuous batching over ``max_batch`` rows of a KV cache of ``max_model_len`` positions.

    ``model``: a transformers causal LM (attached to ``pool``'s slots, or plain when ``pool`` is None: the base
    model only). Use :meth:`add` then :meth:`step` until :attr:`busy` is False, or :meth:`generate`.
    ``max_prompt_len`` (default: ``max_model_len - 1``) bounds the prompt buckets compiled at warm-up.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        pool=None,
        *,
        max_batch: int = 8,
        max_model_len: int = 512,
        backend: str | None = "inductor",  # None or "none": nothing compiled (eager, for smoke runs)
        eos_ids: Sequence[int] | None = None,
        max_prompt_len: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.pool = model, tokenizer, pool
        self.max_batch, self.max_model_len = max_batch, max_model_len
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.eos_ids = set(eos_ids if eos_ids is not None else _eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids or {0})
        self.buffers = RowBuffers(model.config, max_batch, max_model_len, self.dtype, self.device)
        self.max_prompt_len = min(max_prompt_len or max_model_len - 1, max_model_len - 1)
        self.buckets = prefill_buckets(self.max_prompt_len)
        device = self.device
        # Everything a compiled step reads: fixed shapes, written in place between steps.
        self._tokens = torch.full((max_batch, 1), self.pad_id, dtype=torch.long, device=device)
        self._positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._temperature = torch.zeros(max_batch, dtype=torch.float32, device=device)
        self._top_p = torch.ones(max_batch, dtype=torch.float32, device=device)
        self._seeds = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._row = torch.zeros((), dtype=torch.long, device=device)
        self._decode_cache = DecodeCache(self.buffers, self._positions)
        self._prefill_cache = PrefillCache(self.buffers, self._row)
        self._decode = self._compiled(TokenEngine._decode_step, backend)
        self._prefills = {length: self._compiled(TokenEngine._prefill_step, backend) for length in self.buckets}
        self._rows: list[Generation | None] = [None] * max_batch
        self._waiting: deque[Generation] = deque()
        self.steps = 0
        self.requests = 0

    def _compiled(self, function: Callable, backend: str | None) -> Callable:
        """``function`` bound to this engine, compiled with static shapes (eager when ``backend`` is None)."""
        if backend is None or backend == "none":
            return types.MethodType(function, self)
        return torch.compile(types.MethodType(_fresh_function(function), self), backend=backend, dynamic=False)

    # -- requests --------------------------------------------------------------------------------

    def check(self, request: TextRequest) -> None:
        """Raise :class:`RequestTooLongError` if ``request`` cannot fit a row."""
        total = len(request.prompt_ids) + request.max_tokens
        if len(request.prompt_ids) > self.max_prompt_len:
            raise RequestTooLongError(
                f"the prompt has {len(request.prompt_ids)} tokens, beyond this engine's max_prompt_len of "
                f"{self.max_prompt_len}; shorten the prompt"
            )
        if total > self.max_model_len or not request.prompt_ids:
            raise RequestTooLongError(
                f"the prompt ({len(request.prompt_ids)} tokens) plus max_tokens ({request.max_tokens}) is {total} tokens, "
                f"beyond this server's max_model_len of {self.max_model_len}; shorten the prompt or lower max_tokens "
                "(or start the server with a larger --max-model-len)"
                if request.prompt_ids
                else "the prompt is empty; give at least one token"
            )

    def add(self, request: TextRequest, on_event: Callable[[Event], None] = lambda event: None) -> Generation:
        """Queue ``request``; it joins at the next :meth:`step` that has a free row for it."""
        self.check(request)
        seed = request.seed if request.seed is not None else random.getrandbits(31)
        sequence = Generation(request, on_event, seed)
        self._waiting.append(sequence)
        return sequence

    @staticmethod
    def cancel(sequence: Generation) -> None:
        """The client went away: the row is freed at the next step (a flag: safe from another thread)."""
        sequence.cancelled = True

    def abort(self) -> list[Generation]:
        """Take every request out of the engine (after a step failed); their rows and the queue are emptied."""
        gone = [sequence for sequence in self._rows if sequence is not None] + list(self._waiting)
        self._rows = [None] * self.max_batch
        self._waiting.clear()
        for sequence in gone:
            sequence.finish_reason = "error"
        return gone

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(row is not None for row in self._rows)

    @property
    def running(self) -> int:
        """Rows held by requests still wanted (a cancelled one leaves at the next step)."""
        return sum(row is not None and not row.cancelled for row in self._rows)

    def generate(self, requests: Sequence[TextRequest]) -> list[tuple[str, str, int]]:
        """Run ``requests`` to completion: ``(text, finish_reason, completion_tokens)`` each (tests, benchmarks)."""
        sequences = [self.add(request) for request in requests]
        while self.busy:
            self.step()
        return [(sequence.text, sequence.finish_reason, len(sequence.tokens)) for sequence in sequences]

    # -- the step ----------------------------------------------------------------------------------

    def step(self) -> None:
        """Free cancelled rows, prefill the requests that fit, then one decode over every running row."""
        for row, sequence in enumerate(self._rows):
            if sequence is not None and sequence.cancelled:
                self._finish(sequence, "cancelled")
        self._admit()
        if any(row is not None for row in self._rows):
            self._decode_all()
            self.steps += 1

    def _admit(self) -> None:
        while self._waiting:
            sequence = self._waiting[0]
            if sequence.cancelled:
                self._waiting.popleft()
                continue
            free = [row for row, held in enumerate(self._rows) if held is None]
            if not free or not self._fits(sequence):
                return
            self._waiting.popleft()
            sequence.row = free[0]
            self._rows[free[0]] = sequence
            self.requests += 1
            self._prefill(sequence)

    def _fits(self, sequence: Generation) -> bool:
        """Whether the running rows' adapters plus this one fit the pool's slots (one routing per step)."""
        if self.pool is None or sequence.request.adapter is None:
            return True
        adapters = {s.request.adapter for s in self._rows if s is not None} | {sequence.request.adapter}
        return len(adapters - {None}) <= self.pool.slot_count

    def _route(self, sequences: Sequence[Generation | None]):
        if self.pool is None:
            return nullcontext()
        rows = []
        for sequence in sequences:
            request = None if sequence is None else sequence.request
            if request is None or request.adapter is None:
                rows.append(None)
            else:
                rows.append(request.adapter if request.lora_scale == 1.0 else {request.adapter: request.lora_scale})
        return self.pool.route(rows)

    def _prefill(self, sequence: Generation) -> None:
        request = sequence.request
        length = len(request.prompt_ids)
        bucket = next(size for size in self.buckets if size >= length)
        ids = torch.full((1, bucket), self.pad_id, dtype=torch.long)
        ids[0, :length] = torch.tensor(request.prompt_ids)
        self._row.fill_(sequence.row)
        params = torch.tensor([request.temperature, request.top_p]).to(self.device)
        with self._route([sequence]), torch.no_grad():
            token = self._prefills[bucket](
                ids.to(self.device), torch.tensor([length - 1], device=self.device), params[:1], params[1:],
                torch.tensor([sequence.seed], device=self.device), torch.tensor([length], device=self.device),
            )
        self._accept(sequence, int(token[0]))

    def _decode_all(self) -> None:
        rows = self._rows
        tokens, positions, temperature, top_p, seeds = [], [], [], [], []
        for sequence in rows:
            if sequence is None:
                tokens.append(self.pad_id), positions.append(0), temperature.append(0.0), top_p.append(1.0), seeds.append(0)
                continue
            tokens.append(sequence.tokens[-1])
            positions.append(sequence.prompt_tokens + len(sequence.tokens) - 1)
            temperature.append(sequence.request.temperature), top_p.append(sequence.request.top_p), seeds.append(sequence.seed)
        self._tokens.copy_(torch.tensor(tokens).view(-1, 1))
        self._positions.copy_(torch.tensor(positions))
        self._temperature.copy_(torch.tensor(temperature))
        self._top_p.copy_(torch.tensor(top_p))
        self._seeds.copy_(torch.tensor(seeds))
        with self._route(rows), torch.no_grad():
            chosen = self._decode(self._tokens, self._positions, self._temperature, self._top_p, self._seeds).tolist()
        for sequence, token in zip(list(rows), chosen):
            if sequence is not None:
                self._accept(sequence, token)

    def _decode_step(self, tokens, positions, temperature, top_p, seeds):
        mask = decode_mask(positions, self.max_model_len, self.dtype)
        logits = self.model(
            input_ids=tokens, position_ids=positions.view(-1, 1), attention_mask=mask, cache=self._decode_cache, use_cache=True
        ).logits[:, -1]
        return sample(logits, temperature, top_p, seeds, positions + 1)

    def _prefill_step(self, ids, last, temperature, top_p, seeds, position):
        length = ids.shape[1]
        mask = prefill_mask(length, self.dtype, ids.device)
        logits = self.model(
            input_ids=ids, position_ids=torch.arange(length, device=ids.device).view(1, -1), attention_mask=mask,
            cache=self._prefill_cache, use_cache=True, logits_to_keep=last,
        ).logits[:, -1]
        return sample(logits, temperature, top_p, seeds, position)

    # -- tokens to text ----------------------------------------------------------------------------

    def _accept(self, sequence: Generation, token: int) -> None:
        now = time.perf_counter()
        if sequence.first_token_at is None:
            sequence.first_token_at = now
        sequence.token_times.append(now)
        if token in self.eos_ids:
            self._finish(sequence, "stop")
            return
        sequence.tokens.append(token)
        self._detokenize(sequence)
        stop = self._find_stop(sequence)
        if stop is not None:
            sequence.text = sequence.text[:stop]
            self._finish(sequence, "stop")
        elif len(sequence.tokens) >= sequence.request.max_tokens:
            self._finish(sequence, "length")
        else:
            safe = len(sequence.text) - _held_back(sequence.text, sequence.request.stop)
            if safe > sequence.sent:
                piece, sequence.sent = sequence.text[sequence.sent : safe], safe
                sequence.on_event(Event(piece, len(sequence.tokens)))

    def _detokenize(self, sequence: Generation) -> None:
        """Append the new token's text: decode a window of a few tokens (vLLM's prefix/read offsets), so that a
        token's text that depends on its neighbours (a leading space, a multi-byte character) comes out right."""
        tokens = sequence.tokens
        decode = self.tokenizer.decode
        prefix = decode(tokens[sequence.prefix_offset : sequence.read_offset], skip_special_tokens=True)
        window = decode(tokens[sequence.prefix_offset :], skip_special_tokens=True)
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            sequence.text += window[len(prefix) :]
            sequence.prefix_offset, sequence.read_offset = sequence.read_offset, len(tokens)

    @staticmethod
    def _find_stop(sequence: Generation) -> int | None:
        stops = sequence.request.stop
        if not stops:
            return None
        start = max(0, sequence.sent - max(len(stop) for stop in stops))
        found = [index for stop in stops if (index := sequence.text.find(stop, start)) >= 0]
        return min(found) if found else None

    def _finish(self, sequence: Generation, reason: str) -> None:
        sequence.finish_reason = reason
        if sequence.row >= 0 and self._rows[sequence.row] is sequence:
            self._rows[sequence.row] = None
        if reason == "cancelled":
            return
        piece, sequence.sent = sequence.text[sequence.sent :], len(sequence.text)
        sequence.on_event(Event(piece, len(sequence.tokens), reason))

    # -- warm-up -----------------------------------------------------------------------------------

    def warm_up(self, adapter: str | None = None) -> None:
        """Compile every prefill bucket and the decode step (rows on ``adapter`` and on the base, sampled and
        greedy), so that no request compiles afterwards."""
        for bucket in self.buckets:
            length = bucket
            prompt = [self.pad_id] * length
            requests = [
                TextRequest(prompt, adapter=adapter, max_tokens=1, temperature=0.0),
                TextRequest(prompt[: max(1, length // 2)], adapter=None, max_tokens=2, temperature=0.7, seed=1, top_p=0.9),
            ]
            self.generate(requests)
        self.requests = 0
        self.steps = 0


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string (held back until they cannot)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """The end-of-sequence ids ``generate`` stops at: the generation config's (one or a list) and the tokenizer's."""
    ids = set()
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
