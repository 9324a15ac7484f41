"""What one replica serves: a transformers causal LM or a diffusers pipeline, attached, compiled once, warmed up.

No Ray here: an engine is a plain object, so it can be tested, benchmarked and used without a cluster.
:class:`TextEngine` answers completion batches with one routed ``generate()`` (left padding, attention
mask; each row on its own adapter); :class:`PeftTextEngine` is the baseline of ``loraswap bench
serve`` (PEFT's eager model, ``load_adapter``/``set_adapter`` per request).
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdapterNotFoundError, HotswapError
from ..info import adapter_paths
from .pool import AdapterPool


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
    """``{name: path}`` for each adapter in ``directory``: the folder name, or the file name without ``.safetensors``."""
    paths = adapter_paths([directory])
    names = {Path(path).name.removesuffix(".safetensors"): path for path in paths}
    if len(names) < len(paths):
        raise AdapterNotFoundError(f"{directory}: two adapters share a name (a folder and a .safetensors file); rename one")
    return names


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


class TextEngine:
    """A causal LM with loraswap slots, ``forward`` compiled once; rows of one batch on different adapters."""

    def __init__(
        self,
        folder: str | os.PathLike,
        adapters: Mapping[str, str],
        *,
        slots: int = 4,
        max_batch: int = 8,
        backend: str = "inductor",
    ) -> None:
        import loraswap
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.adapters = dict(adapters)
        self.max_batch = max_batch
        self.tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        capacity = loraswap.Capacity.for_adapters(
            list(self.adapters.values()), model=self.model, slots=slots, max_batch=max_batch, max_blend=1
        )
        self.slots = loraswap.attach(self.model, capacity)
        self.pool = AdapterPool(self.slots, resolve=self.adapters.__getitem__)
        self.model.forward = torch.compile(self.model.forward, dynamic=True, backend=backend)
        self._lock = threading.Lock()
        self.requests = 0
        self._compiles = loraswap.CompileCounter()

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def validate(self, adapter: str) -> None:
        """Read, validate and pad ``adapter`` into the host cache; raises its :class:`HotswapError`."""
        self.slots.packed(self.adapters[adapter])

    def warm_up(self) -> None:
        """Compile every graph serving needs (batch 1 and many, prefill and decode), then count from zero."""
        names = list(self.adapters)[: self.slots.capacity.slots] or [None]
        for rows in (1, 2):
            batch = [CompletionRow(names[i % len(names)], "warm up " * (i + 1), max_tokens=3) for i in range(rows)]
            self.complete(batch, count=False)
        self._compiles.__enter__()

    def stats(self) -> dict[str, int]:
        pool = self.pool.stats
        return {
            "recompiles": self._compiles.graphs,
            "slot_loads": pool["slot_loads"],
            "host_hits": pool["host_hits"],
            "requests": self.requests,
        }

    def complete(self, rows: Sequence[CompletionRow], count: bool = True) -> list[Completion]:
        """Greedy rows in one routed ``generate()``; each sampled row alone (its ``seed`` drives torch's RNG)."""
        greedy = [index for index, row in enumerate(rows) if row.temperature == 0.0]
        results: dict[int, Completion] = {}
        with self._lock:
            for chunk in self._chunks(greedy, rows):
                results.update(zip(chunk, self._generate([rows[i] for i in chunk])))
            for index, row in enumerate(rows):
                if index not in results:
                    results[index] = self._generate([row])[0]
            if count:
                self.requests += len(rows)
        return [results[index] for index in range(len(rows))]

    def _chunks(self, indices: Sequence[int], rows: Sequence[CompletionRow]) -> list[list[int]]:
        """Consecutive runs of ``indices`` with at most ``max_batch`` rows and at most ``slots`` distinct adapters."""
        chunks: list[list[int]] = []
        adapters: set[str] = set()
        for index in indices:
            adapter = rows[index].adapter
            new_adapters = adapters | ({adapter} - {None})
            if not chunks or len(chunks[-1]) == self.max_batch or len(new_adapters) > self.slots.capacity.slots:
                chunks.append([])
                new_adapters = {adapter} - {None}
            chunks[-1].append(index)
            adapters = new_adapters
        return chunks

    def _generate(self, rows: Sequence[CompletionRow]) -> list[Completion]:
        encoded = self.tokenizer([row.prompt for row in rows], return_tensors="pt", padding=True)
        new_tokens = max(row.max_tokens for row in rows)
        sample = rows[0].temperature > 0.0
        if sample and rows[0].seed is not None:
            torch.manual_seed(rows[0].seed)
        with self.pool.route([row.adapter for row in rows]), torch.no_grad():
            output = self.model.generate(
                **encoded,
                max_new_tokens=new_tokens,
                do_sample=sample,
                temperature=rows[0].temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.pad_id,
            )
        prompt_length = encoded["input_ids"].shape[1]
        return [
            self._decode(output[i, prompt_length:], row, int(encoded["attention_mask"][i].sum()))
            for i, row in enumerate(rows)
        ]

    def _decode(self, new: torch.Tensor, row: CompletionRow, prompt_tokens: int) -> Completion:
        tokens = new[: row.max_tokens].tolist()
        eos = self.tokenizer.eos_token_id
        finish = "length"
        if eos in tokens:
            tokens, finish = tokens[: tokens.index(eos)], "stop"
        return Completion(self.tokenizer.decode(tokens, skip_special_tokens=True), finish, prompt_tokens, len(tokens))
