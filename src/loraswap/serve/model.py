"""What one replica serves: a transformers causal LM or a diffusers pipeline, attached, compiled once, warmed up.

No Ray here: an engine is a plain object, so it can be tested, benchmarked and used without a cluster.
:class:`TextEngine` answers completion batches with one routed ``generate()`` (left padding, attention
mask; each row on its own adapter); :class:`PeftTextEngine` is the baseline of ``loraswap bench
serve`` (PEFT's eager model, ``load_adapter``/``set_adapter`` per request).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterNotFoundError, HotswapError
from ..folder import AdapterFolder
from ..pool import AdapterPool, pool_batches


class ModelFolderError(HotswapError, ValueError):
    """MODEL is neither a transformers causal LM folder nor a diffusers pipeline folder."""


def resolve_model_folder(model: str | os.PathLike) -> Path:
    """A local folder as it is; otherwise a hub id from the local cache only (a server never downloads at start)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(model), local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as err:
        raise AdapterNotFoundError(
            f"{model}: not a local folder and not in the local hub cache; download it first "
            f"(huggingface-cli download {model}) or pass its folder"
        ) from err


def model_kind(folder: Path) -> str:
    """``"images"`` for a diffusers pipeline folder (``model_index.json``), ``"text"`` for a transformers one."""
    if (folder / "model_index.json").is_file():
        return "images"
    if (folder / "config.json").is_file():
        return "text"
    raise ModelFolderError(
        f"{folder}: holds neither model_index.json (diffusers pipeline) nor config.json (transformers model); "
        "pass the folder that save_pretrained wrote"
    )


def served_adapters(directory: str | os.PathLike) -> dict[str, str]:
    """``{name: path}`` for every adapter in ``directory``, named as :class:`AdapterFolder` names them."""
    folder = AdapterFolder(directory)
    return {name: str(folder(name)) for name in folder.ids()}


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class CompletionRow:
    """One prompt of one request: what a batch needs to generate it."""

    adapter: str | None
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None


def adapter_batches(indices: Sequence[int], adapters: Sequence[str | None], max_rows: int) -> list[list[int]]:
    """``indices`` grouped by adapter (in order of first use), each group cut into batches of ``max_rows``:
    one adapter per batch, as PEFT's ``set_adapter`` needs."""
    by_adapter: dict[str | None, list[int]] = {}
    for index in indices:
        by_adapter.setdefault(adapters[index], []).append(index)
    return [group[start : start + max_rows] for group in by_adapter.values() for start in range(0, len(group), max_rows)]


def refused_adapters(adapters: Mapping[str, str], model: torch.nn.Module) -> dict[str, HotswapError]:
    """The adapters that cannot be served on ``model`` (unreadable, unsupported, a target it lacks), with why.

    The server starts without them and answers their requests with 400 and this error.
    """
    import loraswap

    refused = {}
    for name, path in adapters.items():
        try:
            loraswap.Capacity.for_adapters([path], model=model)
        except HotswapError as err:
            refused[name] = err
    return refused


class _TextModel:
    """Tokenizer, model and the batched greedy/sampled ``generate`` both text engines share."""

    def __init__(self, folder: str | os.PathLike, adapters: Mapping[str, str], max_batch: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.adapters = dict(adapters)
        self.max_batch = max_batch
        self.tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.lock = threading.Lock()
        self.requests = 0

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def validate(self, adapter: str) -> None:
        raise NotImplementedError

    def complete(self, rows: Sequence[CompletionRow], count: bool = True) -> list[Completion]:
        """Greedy rows in batches (:meth:`_batches`); each sampled row alone (its ``seed`` drives torch's RNG)."""
        greedy = [index for index, row in enumerate(rows) if row.temperature == 0.0]
        results: dict[int, Completion] = {}
        with self.lock:
            for batch in self._batches(greedy, rows):
                results.update(zip(batch, self._generate([rows[i] for i in batch])))
            for index, row in enumerate(rows):
                if index not in results:
                    results[index] = self._generate([row])[0]
            if count:
                self.requests += len(rows)
        return [results[index] for index in range(len(rows))]

    def _batches(self, indices: Sequence[int], rows: Sequence[CompletionRow]) -> list[list[int]]:
        raise NotImplementedError

    def _routed(self, adapters: Sequence[str | None]):
        """A context in which ``self.model`` computes row ``i`` with ``adapters[i]``."""
        raise NotImplementedError

    min_rows = 1  # rows a ``generate`` gets at least (copies of the first row, dropped after)
    lead_pad = 0  # masked padding columns put before every prompt

    def _generate(self, rows: Sequence[CompletionRow]) -> list[Completion]:
        answered = len(rows)
        rows = [*rows, *[rows[0]] * (self.min_rows - len(rows))]
        encoded = self.tokenizer([row.prompt for row in rows], return_tensors="pt", padding=True)
        if self.lead_pad:
            encoded["input_ids"] = torch.nn.functional.pad(encoded["input_ids"], (self.lead_pad, 0), value=self.pad_id)
            encoded["attention_mask"] = torch.nn.functional.pad(encoded["attention_mask"], (self.lead_pad, 0), value=0)
        sample = rows[0].temperature > 0.0
        if sample and rows[0].seed is not None:
            torch.manual_seed(rows[0].seed)
        with self._routed([row.adapter for row in rows]), torch.no_grad():
            output = self.model.generate(
                **encoded,
                max_new_tokens=max(row.max_tokens for row in rows),
                do_sample=sample,
                temperature=rows[0].temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.pad_id,
            )
        prompt_length = encoded["input_ids"].shape[1]
        return [
            self._decode(output[i, prompt_length:], row, int(encoded["attention_mask"][i].sum()))
            for i, row in enumerate(rows[:answered])
        ]

    def _decode(self, new: torch.Tensor, row: CompletionRow, prompt_tokens: int) -> Completion:
        tokens = new[: row.max_tokens].tolist()
        eos = self.tokenizer.eos_token_id
        finish = "length"
        if eos in tokens:
            tokens, finish = tokens[: tokens.index(eos)], "stop"
        return Completion(self.tokenizer.decode(tokens, skip_special_tokens=True), finish, prompt_tokens, len(tokens))


class TextEngine(_TextModel):
    """A causal LM with loraswap slots, ``forward`` compiled once; rows of one batch on different adapters.

    dynamo specializes sizes 0 and 1, and transformers passes the model more arguments when a batch
    has padding: a batch of one row, a one-token prompt or a batch without padding would each compile
    graphs of their own (and together hit dynamo's recompile limit, after which it silently runs eager).
    So every ``generate`` gets at least two rows and one masked padding column before the prompts; two
    graphs (prefill, decode) then serve every request.
    """

    min_rows = 2
    lead_pad = 1

    def __init__(
        self,
        folder: str | os.PathLike,
        adapters: Mapping[str, str],
        *,
        slots: int = 4,
        max_batch: int = 8,
        backend: str = "inductor",
        mixed: bool = True,
    ) -> None:
        import loraswap

        super().__init__(folder, adapters, max_batch)
        self.mixed = mixed  # False: one adapter per generate(), as PEFT does (``bench serve``'s comparison)
        self.refused = refused_adapters(self.adapters, self.model)
        usable = [path for name, path in self.adapters.items() if name not in self.refused]
        capacity = loraswap.Capacity.for_adapters(usable, model=self.model, slots=slots, max_batch=max_batch, max_blend=1)
        self.slots = loraswap.attach(self.model, capacity)
        self.pool = AdapterPool(self.slots, resolve=self.adapters.__getitem__)
        self.model.forward = torch.compile(self.model.forward, dynamic=True, backend=backend)
        self._compiles = loraswap.CompileCounter()

    def validate(self, adapter: str) -> None:
        """Read, validate and pad ``adapter`` into the host cache; raises its :class:`HotswapError`."""
        if adapter in self.refused:
            raise self.refused[adapter]
        self.pool.prefetch([adapter])[0].result()

    def warm_up(self) -> None:
        """Compile the prefill and decode graphs, then count recompiles from zero.

        Two batches of different sizes and prompt lengths: dynamo compiles the first call's sizes as
        constants and makes a size dynamic only when a second value arrives, which must happen here,
        not at the first request of another batch size. Every row is on one adapter, so that with
        ``mixed=False`` (one ``generate()`` per adapter) the batches keep their 2 and 3 rows: rows on two
        adapters split into batches of 2 and 2 (one row padded to ``min_rows``), and the first batch of 3
        rows of one adapter recompiled."""
        adapter = next((name for name in self.adapters if name not in self.refused), None)
        for rows, prompt in ((2, "warm up"), (3, "warm up the model")):
            self.complete([CompletionRow(adapter, prompt, max_tokens=3)] * rows, count=False)
        self._compiles.__enter__()

    def stats(self) -> dict[str, int]:
        pool = self.pool.stats
        return {
            "recompiles": self._compiles.graphs,
            "slot_loads": pool["slot_loads"],
            "host_hits": pool["host_hits"],
            "requests": self.requests,
        }

    def _batches(self, indices: Sequence[int], rows: Sequence[CompletionRow]) -> list[list[int]]:
        adapters = [row.adapter for row in rows]
        if not self.mixed:
            return adapter_batches(indices, adapters, self.max_batch)
        return pool_batches(indices, adapters, self.max_batch, self.pool.slot_count)

    def _routed(self, adapters: Sequence[str | None]):
        return self.pool.route(list(adapters))


class PeftTextEngine(_TextModel):
    """The baseline: PEFT's eager model, ``load_adapter``/``set_adapter`` per adapter, one adapter per batch.

    Keeps at most ``slots`` adapters loaded (least recently used deleted first), as many as loraswap's slots.
    """

    def __init__(self, folder: str | os.PathLike, adapters: Mapping[str, str], *, slots: int = 4, max_batch: int = 8, **_) -> None:
        from peft import PeftModel

        super().__init__(folder, adapters, max_batch)
        self.base_model = self.model
        self.slots = slots
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.loads = 0
        self.hits = 0
        self._peft_model_class = PeftModel

    def validate(self, adapter: str) -> None:
        """PEFT reads the adapter when it loads it; a missing one fails there."""

    def warm_up(self) -> None:
        """Nothing to compile: PEFT runs eager (a compiled PEFT model recompiles on every swap)."""

    def stats(self) -> dict[str, int]:
        return {"recompiles": 0, "slot_loads": self.loads, "host_hits": self.hits, "requests": self.requests}

    def _batches(self, indices: Sequence[int], rows: Sequence[CompletionRow]) -> list[list[int]]:
        """One batch per adapter (PEFT's ``set_adapter`` applies to the whole model)."""
        return adapter_batches(indices, [row.adapter for row in rows], self.max_batch)

    @contextmanager
    def _routed(self, adapters: Sequence[str | None]):
        adapter = adapters[0]
        if adapter is None:
            if isinstance(self.model, self._peft_model_class):
                with self.model.disable_adapter():
                    yield
            else:
                yield
            return
        self._load(adapter)
        self.model.set_adapter(adapter)
        yield

    def _load(self, adapter: str) -> None:
        if adapter in self.loaded:
            self.loaded.move_to_end(adapter)
            self.hits += 1
            return
        path = self.adapters[adapter]
        if isinstance(self.model, self._peft_model_class):
            self.model.load_adapter(path, adapter_name=adapter)
        else:
            self.model = self._peft_model_class.from_pretrained(self.base_model, path, adapter_name=adapter).eval()
        self.loads += 1
        self.loaded[adapter] = None
        if len(self.loaded) > self.slots:
            evicted, _ = self.loaded.popitem(last=False)
            self.model.set_adapter(adapter)
            self.model.delete_adapter(evicted)


TEXT_ENGINES = ("loraswap", "loraswap-per-adapter", "peft")  # what ``build_app(engine=...)`` runs in the replicas


def make_engine(folder: str, adapters: Mapping[str, str], options: Mapping[str, Any]):
    """The engine a replica runs: loraswap or the PEFT baseline for text, loraswap for images."""
    if options["kind"] == "images":
        from .images import ImageEngine

        return ImageEngine(folder, adapters, slots=options["slots"], sizes=options["sizes"], backend=options["backend"])
    sizes = {"slots": options["slots"], "max_batch": options["max_batch"], "backend": options["backend"]}
    if options["engine"] == "peft":
        return PeftTextEngine(folder, adapters, **sizes)
    return TextEngine(folder, adapters, mixed=options["engine"] != "loraswap-per-adapter", **sizes)
