"""The ways of serving a LoRA stream that :mod:`.transformer` times, each on its own copy of one random-init model.

- eager base, compiled base (batch 1 and batch 4): no LoRA, the references of speed;
- loraswap slots: ``attach`` with the four LoRAs' union capacity (``per_layer_rank=True``), one slot, ``load``
  per request from the host cache; every step computes the union of the LoRAs' layers;
- loraswap slots, 4 prompts on 4 LoRAs: four slots, one LoRA each, ``route([0, 1, 2, 3])`` and one batch-4 step;
- loraswap fused: ``attach(mode="fused")``; ``load`` merges the request's LoRA into the weights;
- diffusers ``enable_lora_hotswap(target_rank)`` + ``load_lora_adapter(..., hotswap=True)``: where diffusers
  refuses (the next LoRA targets layers the current one does not), ``unload_lora`` + ``load_lora_adapter``,
  which recompiles (both counted);
- merge-on-load (vLLM-Omni's fix): base weights restored from a pristine copy, ``load_lora_adapter`` +
  ``fuse_lora`` + ``unload_lora`` per request: one full rewrite of the targeted weights per swap.

Every compiled mode uses ``dynamic=False``: the batch-4 modes get their own graphs instead of turning the batch
dimension symbolic for every mode.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapter import Adapter
from ..attach import attach
from ..capacity import Capacity
from ..diffusers.model import read_model_adapter

EAGER = "eager base"
COMPILED = "compiled base"
COMPILED_4 = "compiled base, batch 4"
SLOTS = "loraswap slots"
ROUTED = "loraswap slots, 4 prompts on 4 LoRAs"
FUSED = "loraswap fused"
HOTSWAP = "diffusers enable_lora_hotswap"
MERGE = "merge-on-load (load + fuse_lora)"
LORASWAP_MODES = (SLOTS, ROUTED, FUSED)
ROUTED_KEY = "routed"  # the reference of the 4-on-4 call


@dataclass
class Mode:
    """One way of serving: ``swap(name)`` makes the named LoRA current, ``run()`` is one denoising step."""

    run: Callable[[], torch.Tensor]
    swap: Callable[[str], None]
    extra: Callable[[], int] = lambda: 0  # bytes held beyond the base model (slot buffers, host copies, PEFT layers)
    batch: int = 1
    routed: bool = False
    checked: bool = True  # compared with eager diffusers
    refused: int | None = None
    swap_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    request_s: list[float] = field(default_factory=list)
    graphs_while_timed: int = 0
    max_abs_diff: float = 0.0

    @property
    def extra_bytes(self) -> int:
        return self.extra()

    def request(self, name: str, steps: int) -> tuple[float, list[float], torch.Tensor]:
        """``(swap seconds, [step seconds], last output)`` of one request on LoRA ``name``."""
        start = time.perf_counter()
        self.swap(name)
        swap_s = time.perf_counter() - start
        step_s = []
        for _ in range(steps):
            start = time.perf_counter()
            output = self.run()
            step_s.append(time.perf_counter() - start)
        return swap_s, step_s, output


def step(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def read_adapters(base: nn.Module, files: Mapping[str, str]) -> dict[str, Adapter]:
    """Each file as ``model.load_lora_adapter(file, prefix=None)`` reads it."""
    return {name: read_model_adapter(base, file, None, {}) for name, file in files.items()}


def read_ranks(base: nn.Module, file: str) -> dict[str, int]:
    adapter = read_model_adapter(base, file, None, {})
    return {name: layer.rank for name, layer in adapter.layers.items()}


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind ``model``'s parameters and buffers."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _split_rows(inputs: Mapping[str, torch.Tensor], batch: int) -> list[dict[str, torch.Tensor]]:
    shared = ("img_ids", "txt_ids")  # Flux's position ids carry no batch dimension
    return [{k: v if k in shared else v[i : i + 1] for k, v in inputs.items()} for i in range(batch)]


def eager_references(base: nn.Module, files: Mapping[str, str], inputs, routed_inputs) -> dict[str, torch.Tensor]:
    """diffusers' eager output per LoRA (``load_lora_adapter`` + ``set_adapters``), and the 4-on-4 call's: row ``i``
    through LoRA ``i`` alone."""
    model = copy.deepcopy(base)
    names = list(files)
    for index, name in enumerate(names):
        model.load_lora_adapter(files[name], adapter_name=f"lora{index}", prefix=None)
    references = {}
    for index, name in enumerate(names):
        model.set_adapters(f"lora{index}")
        references[name] = step(model, inputs)
    rows = _split_rows(routed_inputs, len(names))
    routed = []
    for index, row in enumerate(rows):
        model.set_adapters(f"lora{index}")
        routed.append(step(model, row))
    references[ROUTED_KEY] = torch.cat(routed)
    return references


def _compile(model: nn.Module, backend: str) -> nn.Module:
    return torch.compile(model, backend=backend, dynamic=False)


def base_modes(base: nn.Module, backend: str, inputs, routed_inputs) -> dict[str, Mode]:
    eager = copy.deepcopy(base)
    compiled = _compile(copy.deepcopy(base), backend)
    compiled_4 = _compile(copy.deepcopy(base), backend)

    def nothing(name: str) -> None:
        return None

    return {
        EAGER: Mode(lambda: step(eager, inputs), nothing, checked=False),
        COMPILED: Mode(lambda: step(compiled, inputs), nothing, checked=False),
        COMPILED_4: Mode(lambda: step(compiled_4, routed_inputs), nothing, batch=len(_split_rows(routed_inputs, 4)),
                         checked=False),  # fmt: skip
    }


def slots_mode(base: nn.Module, adapters: Mapping[str, Adapter], backend: str, inputs, fused: bool = False) -> Mode:
    model = copy.deepcopy(base)
    capacity = Capacity.for_adapters(list(adapters.values()), model=model, per_layer_rank=True)
    slots = attach(model, capacity, mode="fused" if fused else "slots")
    for adapter in adapters.values():
        slots.packed(adapter)  # into the host cache: a swap is then the copy (or merge) alone
    compiled = _compile(model, backend)
    held = storage_bytes(base)

    def extra() -> int:
        pristine = slots.pristine_nbytes if fused else 0
        return storage_bytes(model) - held + pristine + slots.cache.nbytes

    return Mode(lambda: step(compiled, inputs), lambda name: slots.load(adapters[name]), extra)


def routed_mode(base: nn.Module, adapters: Mapping[str, Adapter], backend: str, routed_inputs) -> Mode:
    model = copy.deepcopy(base)
    count = len(adapters)
    capacity = Capacity.for_adapters(list(adapters.values()), model=model, slots=count, per_layer_rank=True)
    slots = attach(model, capacity)
    for slot, adapter in enumerate(adapters.values()):
        slots.load(adapter, slot=slot)
    compiled = _compile(model, backend)
    held = storage_bytes(base)
    ids = list(range(count))
    return Mode(
        lambda: step(compiled, routed_inputs),
        lambda name: slots.route(ids),  # every request: one prompt per LoRA
        lambda: storage_bytes(model) - held + slots.cache.nbytes,
        batch=count,
        routed=True,
    )


REFUSALS = (ValueError, RuntimeError, KeyError)


def hotswap_mode(base: nn.Module, files: Mapping[str, str], backend: str, inputs, target_rank: int) -> Mode:
    """diffusers' order: ``enable_lora_hotswap``, load the first LoRA, compile; then ``hotswap=True`` loads."""
    model = copy.deepcopy(base)
    model.enable_lora_hotswap(target_rank=target_rank)
    model.load_lora_adapter(next(iter(files.values())), adapter_name="default_0", prefix=None)
    compiled = _compile(model, backend)
    held = storage_bytes(base)
    mode = Mode(lambda: step(compiled, inputs), lambda name: None, lambda: storage_bytes(model) - held, refused=0)

    def swap(name: str) -> None:
        try:
            model.load_lora_adapter(files[name], adapter_name="default_0", hotswap=True, prefix=None)
        except REFUSALS:
            mode.refused += 1
            model.unload_lora()
            model.enable_lora_hotswap(target_rank=target_rank, check_compiled="ignore")
            model.load_lora_adapter(files[name], adapter_name="default_0", prefix=None)

    mode.swap = swap
    return mode


def merge_on_load_mode(base: nn.Module, files: Mapping[str, str], targets: list[str], backend: str, inputs) -> Mode:
    """Restore the targeted weights, ``load_lora_adapter`` + ``fuse_lora`` + ``unload_lora``: plain Linear layers
    holding merged weights, as after vLLM-Omni's merge-on-load."""
    model = copy.deepcopy(base)
    weights = [model.get_submodule(name).weight for name in targets]
    pristine = [weight.detach().clone() for weight in weights]
    compiled = _compile(model, backend)

    def swap(name: str) -> None:
        with torch.no_grad():
            torch._foreach_copy_(weights, pristine)
        model.load_lora_adapter(files[name], adapter_name="merge", prefix=None)
        model.fuse_lora(adapter_names=["merge"])
        model.unload_lora()

    return Mode(lambda: step(compiled, inputs), swap, lambda: sum(p.nbytes for p in pristine))


def build_modes(base: nn.Module, files: Mapping[str, str], backend: str, inputs, routed_inputs) -> dict[str, Mode]:
    adapters = read_adapters(base, files)
    union = sorted({name for adapter in adapters.values() for name in adapter.layers})
    target_rank = max(adapter.max_rank for adapter in adapters.values())
    return {
        **base_modes(base, backend, inputs, routed_inputs),
        SLOTS: slots_mode(base, adapters, backend, inputs),
        ROUTED: routed_mode(base, adapters, backend, routed_inputs),
        FUSED: slots_mode(base, adapters, backend, inputs, fused=True),
        HOTSWAP: hotswap_mode(base, files, backend, inputs, target_rank),
        MERGE: merge_on_load_mode(base, files, union, backend, inputs),
    }


def one_pass_over_targets(base: nn.Module, ranks: Mapping[str, Mapping[str, int]], rounds: int) -> float:
    """Median seconds of one copy over every weight any LoRA targets: the floor of rewriting them once."""
    names = sorted({name for layer_ranks in ranks.values() for name in layer_ranks})
    weights = [base.get_submodule(name).weight.detach().clone() for name in names]
    sources = [weight.clone() for weight in weights]
    samples = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        torch._foreach_copy_(weights, sources)
        samples.append(time.perf_counter() - start)
    return sorted(samples[1:])[len(samples[1:]) // 2]
