"""loraswap for diffusers pipelines: every LoRA-loadable component, text encoders included.

``attach(pipe, files_or_capacity, slots=1)`` gives every component that diffusers loads LoRAs into
(``pipe._lora_loadable_modules``: unet or transformer, text_encoder, text_encoder_2, ...) its own
slot layers (core :func:`loraswap.attach`) and returns a :class:`PipelineSlots` with the verbs of
:class:`~loraswap.AdapterSlots` over all components at once.

Reading a LoRA file goes through diffusers' own converters, so it accepts what
``pipe.load_lora_weights`` accepts (diffusers and PEFT-keyed files, kohya/A1111 for SD1.5 and SDXL
te1/te2, kohya/xlabs Flux, hub ids, state dicts): ``type(pipe).lora_state_dict`` turns the file
into diffusers keys plus ``network_alphas``, then each component's part is converted to PEFT keys
with ``convert_unet_state_dict_to_peft`` / ``convert_state_dict`` (text encoders). Two places
where diffusers 0.42 gets a kohya file wrong are done differently here:

- kohya per-module ``alpha``: diffusers folds them into a LoraConfig whose ``alpha_pattern`` keys
  do not name text-encoder modules, so a text-encoder layer gets the most common alpha. Here each
  layer's alpha is traced to its own ``lora_A`` tensor (the converters move tensors, never copy
  them) and its scaling is exactly ``alpha / rank``.
- old-style text-encoder keys (``to_q_lora``) are detected per key, not from whether an
  ``out_proj`` key happens to be present, so a kohya file that trains only ``q_proj`` loads.

A load is transactional across the pipeline: every component's part is read, validated and
padded before any slot is written.

``attach(..., mode="fused")`` gives a :class:`FusedPipelineSlots` instead: each load merges the LoRA
into the components' own weights (core fused mode), so denoising steps cost what the base pipeline
costs, for one merge per swap; it suits serving one LoRA per request.

``enable_lora_hotswap(pipe, target_rank=...)`` is the drop-in for diffusers users: it attaches
and routes the pipeline's own ``load_lora_weights``, ``unload_lora_weights``, ``set_adapters``
and ``delete_adapters`` to loraswap (see its docstring).
"""

from __future__ import annotations

import inspect
import os
import threading
import types
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import torch
from safetensors import SafetensorError
from torch import nn

from .adapter import (
    CONFIG_NAME,
    HUB_ID,
    Adapter,
    adapter_from_state_dict,
    download_from_hub,
    load_adapter,
)
from .attach import attach as attach_model
from .cache import AdapterCache, cache_key, default_cache_bytes
from .capacity import Capacity, check_targets_exist, union_of_ranks
from .errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    CapacityError,
    HotswapError,
    SlotError,
)
from .fused import FusedAdapter, FusedSlots
from .layers import SlotLayer
from .layout import PackedAdapter
from .routing import BlendWeights
from .swap import AdapterSlots

PipelineSource = Union[str, os.PathLike, Mapping[str, torch.Tensor], Adapter, "PipelineAdapter"]

# Layers that diffusers and kohya trainers put LoRAs on, used by enable_lora_hotswap when the caller
# names neither the adapters nor target_modules (PEFT meaning: name suffixes).
DEFAULT_DENOISER_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_in", "proj_out", "proj_mlp", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
DEFAULT_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class PipelineAdapter:
    """One LoRA checkpoint split per pipeline component: component name -> normalised :class:`Adapter`."""

    components: Mapping[str, Adapter]
    source: str

    @property
    def max_rank(self) -> int:
        return max(adapter.max_rank for adapter in self.components.values())

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}: {len(a.layers)} layers" for name, a in self.components.items())
        return f"PipelineAdapter({self.source!r}, {parts})"


@dataclass(frozen=True)
class PackedPipelineAdapter:
    """A pipeline adapter laid out as one slot row per component (None: the adapter leaves it alone)."""

    components: Mapping[str, PackedAdapter | FusedAdapter | None]
    source: str

    @property
    def nbytes(self) -> int:
        return sum(packed.nbytes for packed in self.components.values() if packed is not None)


def lora_components(pipe: Any) -> dict[str, nn.Module]:
    """The components diffusers loads LoRAs into (``pipe._lora_loadable_modules``) that the pipeline has."""
    names = getattr(pipe, "_lora_loadable_modules", None)
    if not names:
        raise HotswapError(
            f"{type(pipe).__name__} has no LoRA-loadable components (_lora_loadable_modules); "
            "loraswap.diffusers works on pipelines that support load_lora_weights"
        )
    return {name: module for name in names if isinstance(module := getattr(pipe, name, None), nn.Module)}


def is_text_encoder(module: nn.Module) -> bool:
    """transformers models (text encoders) take diffusers' text-encoder key path; diffusers models the other."""
    from diffusers import ModelMixin

    return not isinstance(module, ModelMixin)


# ---------------------------------------------------------------------------------------------------------------------
# Reading: any file load_lora_weights accepts -> component -> Adapter


def read_pipeline_adapter(
    pipe: Any, source: PipelineSource, *, allow_pickle: bool = False, **hub_kwargs: Any
) -> PipelineAdapter:
    """Read ``source`` as ``pipe.load_lora_weights`` would, split per component, in PEFT keys with exact scalings.

    ``hub_kwargs`` (``weight_name``, ``subfolder``, ``revision``, ...) go to diffusers' ``lora_state_dict``.
    A PEFT adapter directory (``adapter_config.json``) or an :class:`Adapter` goes to the one component
    that has every layer it targets.
    """
    if isinstance(source, PipelineAdapter):
        return source
    components = lora_components(pipe)
    if isinstance(source, Adapter) or _is_peft_directory(source):
        adapter = load_adapter(source, allow_pickle=allow_pickle)
        return PipelineAdapter({_component_for(adapter, components): adapter}, adapter.source)
    label = _label(source)
    source, hub_kwargs = resolve_hub_id(source, hub_kwargs, allow_pickle)
    state_dict, network_alphas, metadata = _diffusers_state_dict(pipe, source, label, allow_pickle, hub_kwargs)
    _check_prefixes(state_dict, components, label)
    adapters = {}
    for name, module in components.items():
        part = {key[len(name) + 1 :]: value for key, value in state_dict.items() if key.startswith(name + ".")}
        if not part:
            continue
        alphas = {key[len(name) + 1 :]: float(value) for key, value in network_alphas.items() if key.startswith(name + ".")}
        config = {key[len(name) + 1 :]: value for key, value in metadata.items() if key.startswith(name + ".")}
        adapters[name] = component_adapter(part, alphas, config or None, module, f"{label}:{name}")
    if not adapters:
        raise AdapterFormatError(f"{label}: holds no LoRA tensors for any of {sorted(components)}")
    return PipelineAdapter(adapters, label)


def component_adapter(
    state_dict: Mapping[str, torch.Tensor],
    network_alphas: Mapping[str, float],
    config: Mapping[str, Any] | None,
    module: nn.Module,
    source: str,
) -> Adapter:
    """One component's diffusers-keyed LoRA tensors -> :class:`Adapter` (PEFT module names, exact scalings).

    With kohya ``network_alphas``, each layer's scaling is its own ``alpha / rank``; otherwise the
    LoraConfig diffusers saved in the header (``config``) applies, and without one the scaling is 1
    (diffusers' meaning of an alpha-less file).
    """
    alpha_by_tensor = _alphas_by_tensor(state_dict, network_alphas, source)
    try:
        peft_state_dict = _to_peft_keys(state_dict, text_encoder=is_text_encoder(module), module=module)
    except ValueError as err:
        raise AdapterFormatError(f"{source}: diffusers cannot convert these LoRA keys ({err})") from err
    if alpha_by_tensor:
        for key, tensor in list(peft_state_dict.items()):
            if key.endswith(".lora_A.weight") and id(tensor) in alpha_by_tensor:
                module_name = key[: -len(".lora_A.weight")]
                peft_state_dict[f"{module_name}.alpha"] = torch.tensor(alpha_by_tensor[id(tensor)])
        config = None
    return adapter_from_state_dict(peft_state_dict, config, source=source)


def _alphas_by_tensor(state_dict, network_alphas: Mapping[str, float], source: str) -> dict[int, float]:
    """``id(lora_A tensor) -> alpha`` for every kohya alpha, found by the names diffusers gives them.

    diffusers names a layer's alpha after its down weight: ``<module>.alpha`` (unet, ``.lora.`` keys)
    or ``<down key>.alpha`` (text encoders, attention processors). Tensors keep their identity
    through every key converter, so the alpha follows its own layer whatever the key becomes.
    """
    if not network_alphas:
        return {}
    found: dict[int, float] = {}
    used: set[str] = set()
    for key, tensor in state_dict.items():
        if not any(marker in key for marker in (".down.", ".lora_A.", ".lora_down.")):
            continue
        stems = (key.split(".lora.")[0], key.split(".lora_A.")[0], key.split(".lora_down.")[0], key)
        for stem in stems:
            alpha_key = stem + ".alpha"
            if alpha_key in network_alphas:
                found[id(tensor)] = float(network_alphas[alpha_key])
                used.add(alpha_key)
                break
    unused = sorted(set(network_alphas) - used)
    if unused:
        raise AdapterFormatError(
            f"{source}: alpha {unused[0]!r} belongs to no LoRA layer of the file; the file is incomplete or "
            "its keys are in a layout diffusers does not convert"
        )
    return found


def _to_peft_keys(state_dict, text_encoder: bool, module: nn.Module) -> dict[str, torch.Tensor]:
    from diffusers.utils.state_dict_utils import (
        DIFFUSERS_OLD_TO_PEFT,
        DIFFUSERS_TO_PEFT,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    if not text_encoder:
        return convert_unet_state_dict_to_peft(dict(state_dict))
    # Per key: old processor names (to_q_lora) first, then lora_linear_layer / text_projection names.
    converted = convert_state_dict(convert_state_dict(dict(state_dict), DIFFUSERS_OLD_TO_PEFT), DIFFUSERS_TO_PEFT)
    if not hasattr(module, "text_model"):  # transformers 5 flattened CLIPTextModel
        converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    return converted


# keyword arguments of load_lora_weights that say where to download from, not how to read
HUB_DOWNLOAD_KWARGS = ("revision", "cache_dir", "token", "force_download", "proxies", "local_files_only")


def resolve_hub_id(
    source: PipelineSource, hub_kwargs: Mapping[str, Any], allow_pickle: bool = False
) -> tuple[PipelineSource, dict[str, Any]]:
    """A hub id -> its local copy through huggingface_hub (the file ``weight_name`` names, else the repo's
    weight files), plus the read options left for diffusers; any other source comes back unchanged.

    Resolving before reading gives the host cache a file to stamp, so a hub id loads from the cache
    like a path does, and offline (``HF_HUB_OFFLINE=1``) it reads the local HF cache only.
    """
    if not isinstance(source, (str, os.PathLike)) or Path(source).expanduser().exists():
        return source, dict(hub_kwargs)
    repo_id = os.fspath(source)
    if not HUB_ID.match(repo_id):
        return source, dict(hub_kwargs)
    download = {key: value for key, value in hub_kwargs.items() if key in HUB_DOWNLOAD_KWARGS}
    read = {key: value for key, value in hub_kwargs.items() if key not in HUB_DOWNLOAD_KWARGS}
    subfolder = read.pop("subfolder", None)
    if read.get("weight_name"):
        return download_from_hub(repo_id, filename=read.pop("weight_name"), subfolder=subfolder, **download), read
    patterns = ["*.safetensors", "*.bin"] if allow_pickle else ["*.safetensors"]
    if subfolder:
        patterns = [f"{subfolder}/{pattern}" for pattern in patterns]
    return download_from_hub(repo_id, allow_patterns=patterns, **download), {**read, "subfolder": subfolder}


def _diffusers_state_dict(pipe, source, label: str, allow_pickle: bool, hub_kwargs: Mapping[str, Any]):
    """``(state_dict, network_alphas, metadata)`` from the pipeline class's own ``lora_state_dict``."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists() and not HUB_ID.match(os.fspath(source)):
            raise AdapterNotFoundError(
                f"{label}: no such file or directory; pass a LoRA .safetensors file, a directory holding one, "
                "a hub id or a state dict"
            )
        source = str(path) if path.exists() else os.fspath(source)
    elif isinstance(source, Mapping):
        source = dict(source)
    else:
        raise AdapterFormatError(f"cannot read a LoRA from a {type(source).__name__}; pass a path, hub id or state dict")
    read = type(pipe).lora_state_dict
    kwargs: dict[str, Any] = dict(hub_kwargs)
    kwargs["return_lora_metadata"] = True
    kwargs.setdefault("use_safetensors", None if allow_pickle else True)
    wants_alphas = "return_alphas" in inspect.signature(read).parameters
    if wants_alphas:
        kwargs["return_alphas"] = True
    if isinstance(pipe, StableDiffusionXLLoraLoaderMixin) and getattr(pipe, "unet", None) is not None:
        kwargs.setdefault("unet_config", pipe.unet.config)
    try:
        result = read(source, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        if isinstance(err, FileNotFoundError) or "does not appear to have a file" in str(err):
            raise AdapterNotFoundError(f"{label}: diffusers found no LoRA weights there ({err})") from err
        raise AdapterFormatError(f"{label}: diffusers cannot read this LoRA ({type(err).__name__}: {err})") from err
    if len(result) == 3:
        state_dict, network_alphas, metadata = result
    else:
        (state_dict, metadata), network_alphas = result, None
    return state_dict, dict(network_alphas or {}), dict(metadata or {})


def _check_prefixes(state_dict, components: Mapping[str, nn.Module], label: str) -> None:
    """Every key must belong to a component the pipeline has: a LoRA for a missing text_encoder_2 is an error."""
    for key in state_dict:
        if not any(key.startswith(name + ".") for name in components):
            raise CapacityError(
                f"{label}: key {key!r} targets no LoRA-loadable component of this pipeline "
                f"(it has {sorted(components)}); was the LoRA trained for another pipeline?"
            )


def _is_peft_directory(source) -> bool:
    return isinstance(source, (str, os.PathLike)) and (Path(source).expanduser() / CONFIG_NAME).is_file()


def _component_for(adapter: Adapter, components: Mapping[str, nn.Module]) -> str:
    for name, module in components.items():
        names = {module_name for module_name, _ in module.named_modules()}
        if adapter.target_names <= names:
            return name
    raise CapacityError(
        f"{adapter.source}: no component of the pipeline ({sorted(components)}) has every layer the adapter targets, "
        f"e.g. {min(adapter.target_names)!r}; was it trained for another model?"
    )


def _label(source) -> str:
    if isinstance(source, Mapping):
        return "<state dict>"
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)


def _cache_key(source: PipelineSource, hub_kwargs: Mapping[str, Any], allow_pickle: bool = False) -> Hashable | None:
    """The stamps of the files a read would use (a hub id's local copy included) plus the read options;
    None (never cached) for in-memory state dicts."""
    if isinstance(source, (Adapter, PipelineAdapter)):
        return ("object", id(source))
    if isinstance(source, Mapping):
        return None
    source, hub_kwargs = resolve_hub_id(source, hub_kwargs, allow_pickle)
    path = Path(source).expanduser()
    options = tuple(sorted((k, repr(v)) for k, v in hub_kwargs.items()))
    if not path.is_dir():
        return (cache_key(path), options)
    folder = path / hub_kwargs["subfolder"] if hub_kwargs.get("subfolder") else path
    weight_files = sorted(f for f in folder.glob("*") if f.suffix in (".safetensors", ".bin", ".json"))
    return ("dir", str(folder), tuple((f.name, cache_key(f)) for f in weight_files), options)


# ---------------------------------------------------------------------------------------------------------------------
# Attaching and swapping


class PipelineSlots:
    """The :class:`~loraswap.AdapterSlots` verbs over every LoRA-loadable component of a pipeline.

    ``components`` maps a component name (``"unet"``, ``"text_encoder"``, ...) to its own
    :class:`AdapterSlots`, for per-component routing. A load reads and validates every component's
    part before it writes any slot: it either completes in all components or changes none.
    A component the adapter does not target gets its slot emptied, so it runs as the base model.
    Every verb takes ``lock`` (then each component's): a serving thread that holds ``lock`` around each
    pipeline call never sees a swap halfway through the components.
    """

    def __init__(self, pipe: Any, components: Mapping[str, AdapterSlots | FusedSlots], cache: AdapterCache) -> None:
        self.pipe = pipe
        self.components = dict(components)
        self.cache = cache
        self.lock = threading.RLock()
        self.slots = min(s.capacity.slots for s in self.components.values())
        self._loaded: dict[int, str] = {}
        self._prefetcher: ThreadPoolExecutor | None = None

    @property
    def loaded(self) -> dict[int, str]:
        """Slot -> source of the adapter loaded there."""
        return dict(self._loaded)

    def read(self, source: PipelineSource, *, allow_pickle: bool = False, **hub_kwargs: Any) -> PipelineAdapter:
        return read_pipeline_adapter(self.pipe, source, allow_pickle=allow_pickle, **hub_kwargs)

    def packed(self, source: PipelineSource, *, allow_pickle: bool = False, **hub_kwargs: Any) -> PackedPipelineAdapter:
        """``source`` laid out for every component: from the cache, else read, validated in every component, padded."""

        def build() -> PackedPipelineAdapter:
            return self.pack(self.read(source, allow_pickle=allow_pickle, **hub_kwargs))

        key = _cache_key(source, hub_kwargs, allow_pickle)
        if key is None:
            return build()
        keep_alive = source if isinstance(source, (Adapter, PipelineAdapter)) else None
        return self.cache.get_or_build(key, build, keep_alive)

    def pack(self, adapter: PipelineAdapter) -> PackedPipelineAdapter:
        """Validate and lay out every component's part (host memory only: nothing is written before all succeed)."""
        for name in adapter.components:
            if name not in self.components:
                raise CapacityError(
                    f"{adapter.source}: targets {name!r}, which attach() gave no slots; attach with this LoRA among "
                    f"the adapters (or a capacity for {name!r})"
                )
        packed = {
            name: None if (part := adapter.components.get(name)) is None else component.pack(part)
            for name, component in self.components.items()
        }
        return PackedPipelineAdapter(packed, adapter.source)

    def load(self, source: PipelineSource, slot: int = 0, *, allow_pickle: bool = False, **hub_kwargs: Any) -> None:
        """Hot-swap ``source`` into ``slot`` of every component: transactional, cached, no recompilation."""
        self._check_slot(slot)
        packed = self.packed(source, allow_pickle=allow_pickle, **hub_kwargs)
        self._check_layouts()
        with self._all_locks():
            self._write(packed, slot)
            self._loaded[slot] = packed.source

    def _write(self, packed: PackedPipelineAdapter, slot: int) -> None:
        """Every component's part into ``slot``; slot-mode copies cannot fail once packed."""
        for name, component in self.components.items():
            _write_slot(component, packed.components[name], slot)

    def prefetch(self, source: PipelineSource, *, allow_pickle: bool = False, **hub_kwargs: Any) -> Future:
        """Read, validate and pad ``source`` into the host cache on a background thread."""
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraswap-prefetch")
        return self._prefetcher.submit(self.packed, source, allow_pickle=allow_pickle, **hub_kwargs)

    def unload(self, slot: int = 0) -> None:
        """Empty ``slot`` in every component."""
        self._check_slot(slot)
        self._check_layouts()
        with self._all_locks():
            for component in self.components.values():
                component.unload(slot)
            self._loaded.pop(slot, None)

    def activate(self, slot: int) -> None:
        """Every row of every component uses ``slot``."""
        self._check_slot(slot)
        self._check_layouts()
        with self._all_locks():
            for component in self.components.values():
                component.activate(slot)

    def route(self, ids: Sequence[int], *, per_token: bool = False) -> None:
        """Row ``i`` of every component's batch uses slot ``ids[i]`` (-1: base model).

        A pipeline batches differently per component: with classifier-free guidance the unet sees
        ``[negative rows; positive rows]`` while the text encoder sees each half separately. Route the
        unet with ``ids + ids`` then, through ``slots.components["unet"].route(...)``.
        """
        self._check_layouts()
        with self._all_locks():
            for component in self.components.values():
                component.route(ids, per_token=per_token)

    def blend(self, weights: BlendWeights | Sequence[BlendWeights]) -> None:
        """Every row (or row ``i``, given a list) of every component uses the weighted sum of the given slots."""
        self._check_layouts()
        with self._all_locks():
            for component in self.components.values():
                component.blend(weights)

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise SlotError(
                f"slot {slot!r} is outside the {self.slots} slot(s) allocated; use 0..{self.slots - 1} "
                "or attach with slots= larger"
            )

    def _check_layouts(self) -> None:
        """Raise :class:`LayoutChangedError` before any component changes when one was moved or cast after attach."""
        for component in self.components.values():
            component._check_layout()

    def _all_locks(self):
        return _Locks([self.lock, *(component.lock for component in self.components.values())])

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}: {len(s.layout.placements)} layers" for name, s in self.components.items())
        return f"PipelineSlots({parts}, slots={self.slots}, loaded={self._loaded})"


class FusedPipelineSlots(PipelineSlots):
    """:class:`PipelineSlots` whose components run in fused mode (:class:`~loraswap.FusedSlots`): the active
    LoRA is merged into the unet/transformer and text-encoder weights, so a denoising step costs exactly
    the base pipeline's. ``route`` and ``blend`` raise :class:`~loraswap.ModeError`.

    A merge can still fail after validation when a merged weight overflows its dtype; the failing
    component restores itself, and the components merged before it are merged back here, so a load
    or activate completes in every component or changes none.
    """

    components: dict[str, FusedSlots]

    def _write(self, packed: PackedPipelineAdapter, slot: int) -> None:
        previous = {name: component.staged_in(slot) for name, component in self.components.items()}
        self._in_every_component(
            lambda name, component: _write_slot(component, packed.components[name], slot),
            undo=lambda name, component: _write_slot(component, previous[name], slot),
        )

    def activate(self, slot: int) -> None:
        self._check_slot(slot)
        self._check_layouts()
        with self._all_locks():
            previous = {name: component.active for name, component in self.components.items()}
            self._in_every_component(
                lambda name, component: component.activate(slot),
                undo=lambda name, component: component.activate(previous[name]),
            )

    def _in_every_component(
        self, step: Callable[[str, FusedSlots], None], undo: Callable[[str, FusedSlots], None]
    ) -> None:
        """``step`` in every component; when one raises, ``undo`` in those already done, newest first."""
        done = []
        try:
            for name, component in self.components.items():
                step(name, component)
                done.append((name, component))
        except BaseException:
            for name, component in reversed(done):
                undo(name, component)
            raise


class _Locks:
    def __init__(self, locks) -> None:
        self.locks = locks

    def __enter__(self) -> None:
        for lock in self.locks:
            lock.acquire()

    def __exit__(self, *exc) -> None:
        for lock in reversed(self.locks):
            lock.release()


def _write_slot(component: AdapterSlots | FusedSlots, packed: PackedAdapter | FusedAdapter | None, slot: int) -> None:
    """One component's part into ``slot``, or empty the slot where the LoRA leaves the component alone."""
    if packed is None:
        component.unload(slot)
    else:
        component.load_packed(packed, slot)


def capacities_for(
    pipe: Any,
    adapters: Iterable[PipelineSource],
    *,
    slots: int = 1,
    min_rank: int = 1,
    per_layer_rank: bool = False,
    max_batch: int | None = None,
    allow_pickle: bool = False,
) -> tuple[dict[str, Capacity], list[tuple[PipelineSource, PipelineAdapter]]]:
    """Per component: the union of the adapters' targets and their largest rank (at least ``min_rank``);
    with ``per_layer_rank=True`` each layer is sized to the largest rank any adapter gives it."""
    read = [(source, read_pipeline_adapter(pipe, source, allow_pickle=allow_pickle)) for source in adapters]
    if not read:
        raise CapacityError("loraswap.diffusers.attach needs at least one LoRA (or a Capacity)")
    components = lora_components(pipe)
    capacities = {}
    for name, module in components.items():
        parts = [adapter.components[name] for _, adapter in read if name in adapter.components]
        if not parts:
            continue
        ranks = union_of_ranks(parts)
        check_targets_exist(ranks, module, where=f"component {name!r}")
        extra = {} if max_batch is None else {"max_batch": max_batch}
        capacities[name] = Capacity(
            max_rank=max(max(ranks.values()), min_rank),
            target_modules=tuple(sorted(ranks)),
            slots=slots,
            lora_bias=any(part.has_bias for part in parts),
            layer_ranks={layer: max(rank, min_rank) for layer, rank in ranks.items()} if per_layer_rank else {},
            **extra,
        )
    return capacities, read


def attach(
    pipe: Any,
    adapters_or_capacity: Iterable[PipelineSource] | Capacity | Mapping[str, Capacity],
    slots: int = 1,
    *,
    mode: Literal["slots", "fused"] = "slots",
    per_layer_rank: bool = False,
    cache_bytes: int | None = None,
    allow_pickle: bool = False,
) -> PipelineSlots:
    """Give every LoRA-loadable component of ``pipe`` LoRA slots, in place, before compiling; slot 0 is active.

    ``adapters_or_capacity``: the LoRA files (paths, hub ids, state dicts) the service will serve, from
    which each component gets the union of their targets and their largest rank; or one
    :class:`Capacity` applied to every component it matches; or ``{component: Capacity}``.
    The adapters given are read once and kept packed in the host cache. ``per_layer_rank=True`` sizes
    each layer to the largest rank the adapters give it (less padded compute; a later LoRA of
    higher rank there does not fit).

    ``mode="fused"`` merges the active LoRA into the components' weights instead (a
    :class:`FusedPipelineSlots`): no per-step cost, a merge per swap, no ``route``/``blend``.
    """
    components = lora_components(pipe)
    _refuse_peft_layers(components)
    read: list[tuple[PipelineSource, PipelineAdapter]] = []
    if isinstance(adapters_or_capacity, (str, os.PathLike, Adapter, PipelineAdapter)) or (
        isinstance(adapters_or_capacity, Mapping)
        and not all(isinstance(value, Capacity) for value in adapters_or_capacity.values())
    ):
        adapters_or_capacity = [adapters_or_capacity]  # one LoRA, not a list of them
    if isinstance(adapters_or_capacity, Capacity):
        capacities = _matching_components(components, adapters_or_capacity)
    elif isinstance(adapters_or_capacity, Mapping) and all(
        isinstance(value, Capacity) for value in adapters_or_capacity.values()
    ):
        capacities = dict(adapters_or_capacity)
    else:
        capacities, read = capacities_for(
            pipe, adapters_or_capacity, slots=slots, per_layer_rank=per_layer_rank, allow_pickle=allow_pickle
        )
    unknown = sorted(set(capacities) - set(components))
    if unknown:
        raise CapacityError(f"{unknown[0]!r} is not a LoRA-loadable component of this pipeline ({sorted(components)})")
    cache = AdapterCache(default_cache_bytes() if cache_bytes is None else cache_bytes)
    attached = {
        name: attach_model(components[name], capacity, mode=mode, cache_bytes=0) for name, capacity in capacities.items()
    }
    pipeline_slots = (FusedPipelineSlots if mode == "fused" else PipelineSlots)(pipe, attached, cache)
    for source, adapter in read:
        key = _cache_key(source, {}, allow_pickle)
        if key is not None:
            cache.put(key, pipeline_slots.pack(adapter))
    return pipeline_slots


def _matching_components(components: Mapping[str, nn.Module], capacity: Capacity) -> dict[str, Capacity]:
    matching = {
        name: capacity
        for name, module in components.items()
        if any(name_ and capacity.matches(name_) for name_, _ in module.named_modules())
    }
    if not matching:
        raise CapacityError(
            f"no layer of any component ({sorted(components)}) matches target_modules={capacity.target_modules!r}"
        )
    return matching


def _refuse_peft_layers(components: Mapping[str, nn.Module]) -> None:
    for name, module in components.items():
        if any(isinstance(m, SlotLayer) for m in module.modules()):
            raise HotswapError(f"{name} already has loraswap slots; attach once per pipeline")
        if any(hasattr(m, "lora_A") and hasattr(m, "base_layer") for m in module.modules()):
            raise HotswapError(
                f"{name} holds LoRA layers loaded by diffusers/PEFT; call pipe.unload_lora_weights() first, "
                "then attach (loraswap loads the LoRAs itself)"
            )


# ---------------------------------------------------------------------------------------------------------------------
# The drop-in: pipe.enable_lora_hotswap + pipe.load_lora_weights(..., hotswap=True), limits lifted


def enable_lora_hotswap(
    pipe: Any,
    target_rank: int,
    *,
    adapters: Iterable[PipelineSource] | None = None,
    target_modules: Mapping[str, Sequence[str] | str] | None = None,
    slots: int = 1,
    cache_bytes: int | None = None,
    check_compiled: str = "error",
) -> PipelineSlots:
    """Attach loraswap to ``pipe`` and route its LoRA methods to it; call before compiling.

    Routing: the pipeline *instance* gets four attributes that shadow the class's methods (the
    class and every other pipeline are untouched; ``type(pipe).load_lora_weights`` is still diffusers'):

    - ``pipe.load_lora_weights(source, adapter_name=None, hotswap=False, **kwargs)`` ->
      :meth:`PipelineSlots.load` into the slot named ``adapter_name``, then activates it. With
      ``hotswap=True`` it replaces the named adapter (or, unnamed, the last one loaded), text
      encoders included; with ``hotswap=False`` it takes a free slot. ``kwargs`` (``weight_name``,
      ``subfolder``, ...) go to diffusers' ``lora_state_dict``.
    - ``pipe.unload_lora_weights()`` -> empties every slot.
    - ``pipe.set_adapters(names, adapter_weights=None)`` -> :meth:`PipelineSlots.blend`.
    - ``pipe.delete_adapters(names)`` -> empties those slots.

    Capacity: ``adapters`` (the LoRAs to be served) gives each component the union of their targets;
    else ``target_modules`` (component -> PEFT target_modules) or the usual LoRA layers of each
    component (attention, feed-forward and projection layers; q/k/v/out_proj/fc1/fc2 in text
    encoders), each padded to ``target_rank``. Lifted against diffusers: text encoders hot-swap,
    a LoRA may target layers the first did not, a rank above ``target_rank`` raises instead of
    recompiling, kohya per-module alphas load, and a failed load leaves the loaded adapter in place.
    ``check_compiled`` ("error", "warn", "ignore"), as in diffusers: a component compiled before this
    call compiles again at its next forward, once.
    """
    components = lora_components(pipe)
    compiled = sorted(name for name, module in components.items() if _is_compiled(module))
    if compiled and check_compiled != "ignore":
        message = f"{compiled} already compiled: call enable_lora_hotswap before compiling, or they recompile once"
        if check_compiled == "error":
            raise HotswapError(message)
        warnings.warn(message, stacklevel=2)
    if adapters is not None:
        capacities, read = capacities_for(pipe, adapters, slots=slots, min_rank=target_rank)
    else:
        capacities, read = {}, []
        for name, module in components.items():
            targets = (target_modules or {}).get(name) or (
                DEFAULT_TEXT_ENCODER_TARGETS if is_text_encoder(module) else DEFAULT_DENOISER_TARGETS
            )
            capacity = Capacity(max_rank=target_rank, target_modules=targets, slots=slots)
            capacities.update(_wrappable_only(name, module, capacity))
    pipeline_slots = attach(pipe, capacities, slots, cache_bytes=cache_bytes)
    for source, adapter in read:
        key = _cache_key(source, {})
        if key is not None:
            pipeline_slots.cache.put(key, pipeline_slots.pack(adapter))
    _route_lora_methods(pipe, pipeline_slots)
    return pipeline_slots


def _is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod")


def _wrappable_only(name: str, module: nn.Module, capacity: Capacity) -> dict[str, Capacity]:
    """The default targets narrowed to the layers loraswap can wrap (Linear, Conv, Embedding), by full name."""
    from .layers import slot_layer_class

    names = tuple(
        sorted(n for n, m in module.named_modules() if n and capacity.matches(n) and slot_layer_class(m) is not None)
    )
    if not names:
        return {}
    return {name: Capacity(max_rank=capacity.max_rank, target_modules=names, slots=capacity.slots)}


class _AdapterNames:
    """The drop-in's adapter names -> slots, as diffusers names adapters (``default_0``, ``default_1``, ...)."""

    def __init__(self, slots: PipelineSlots) -> None:
        self.slots = slots
        self.by_name: dict[str, int] = {}
        self.last: str | None = None

    def slot_for_load(self, adapter_name: str | None, hotswap: bool) -> tuple[str, int]:
        if hotswap:
            name = adapter_name or self.last
            if name is None or name not in self.by_name:
                if not self.by_name and adapter_name is None:
                    return "default_0", 0
                raise SlotError(
                    f"hotswap=True needs the name of a loaded adapter, got {adapter_name!r}; loaded: "
                    f"{sorted(self.by_name)}. Load it once with hotswap=False first"
                )
            return name, self.by_name[name]
        name = adapter_name or f"default_{len(self.by_name)}"
        if name in self.by_name:
            raise SlotError(f"adapter name {name!r} is already loaded; pass hotswap=True to replace it")
        free = [s for s in range(self.slots.slots) if s not in self.by_name.values()]
        if not free:
            raise SlotError(
                f"all {self.slots.slots} slot(s) hold adapters ({sorted(self.by_name)}); pass hotswap=True with "
                "adapter_name to replace one, or enable_lora_hotswap(..., slots=N) for more"
            )
        return name, free[0]

    def slots_of(self, names: str | Sequence[str]) -> list[int]:
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.by_name:
                raise SlotError(f"no adapter named {name!r} is loaded; loaded: {sorted(self.by_name)}")
        return [self.by_name[name] for name in names]


def _route_lora_methods(pipe: Any, pipeline_slots: PipelineSlots) -> None:
    names = _AdapterNames(pipeline_slots)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap=False, **kwargs):
        kwargs.pop("low_cpu_mem_usage", None)
        name, slot = names.slot_for_load(adapter_name, hotswap)
        pipeline_slots.load(pretrained_model_name_or_path_or_dict, slot, **kwargs)
        names.by_name[name] = slot
        names.last = name
        pipeline_slots.activate(slot)

    def unload_lora_weights(self, *args, **kwargs):
        for slot in sorted(set(names.by_name.values())):
            pipeline_slots.unload(slot)
        names.by_name.clear()
        names.last = None

    def set_adapters(self, adapter_names, adapter_weights=None):
        slot_ids = names.slots_of(adapter_names)
        if adapter_weights is None:
            adapter_weights = [1.0] * len(slot_ids)
        elif not isinstance(adapter_weights, Sequence):
            adapter_weights = [adapter_weights] * len(slot_ids)
        if any(isinstance(weight, Mapping) for weight in adapter_weights):
            raise HotswapError("per-component or per-block adapter_weights are not supported by loraswap; pass floats")
        pipeline_slots.blend(dict(zip(slot_ids, map(float, adapter_weights))))

    def delete_adapters(self, adapter_names):
        for name, slot in zip([adapter_names] if isinstance(adapter_names, str) else adapter_names,
                              names.slots_of(adapter_names)):  # fmt: skip
            pipeline_slots.unload(slot)
            del names.by_name[name]

    for function in (load_lora_weights, unload_lora_weights, set_adapters, delete_adapters):
        object.__setattr__(pipe, function.__name__, types.MethodType(function, pipe))
    object.__setattr__(pipe, "loraswap_slots", pipeline_slots)
