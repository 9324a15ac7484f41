"""What the diffusers drop-ins share: adapter names over slots, diffusers' enable-time checks, and
taking over adapters that diffusers/PEFT already loaded.

diffusers names adapters (``default_0``, ``default_1``, ... when unnamed) and activates, weights,
disables and deletes them by name; :class:`NamedAdapters` keeps those names over loraswap slots and
turns each verb into a routing write (``blend``) or a slot write (``unload``), so none of them
recompiles a compiled model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any, Protocol

from torch import nn

from ..adapter import Adapter, adapter_from_state_dict
from ..errors import CapacityError, HotswapError, ModeError, RankOverCapacityError, SlotError
from ..routing import BlendWeights

CHECK_COMPILED = ("error", "warn", "ignore")


@contextmanager
def in_target_rank_words(target_rank: int) -> Iterator[None]:
    """A load whose rank exceeds the capacity, said in the drop-in's words: ``target_rank``, which a diffusers
    user set, not ``Capacity.max_rank``, which they never saw."""
    try:
        yield
    except RankOverCapacityError as err:
        raise CapacityError(
            f"layer {err.layer!r}: the LoRA's rank {err.rank} exceeds the rank {err.capacity_rank} that "
            f"enable_lora_hotswap(target_rank={target_rank}) padded it to; call enable_lora_hotswap with "
            f"target_rank={err.rank} (or more) before loading the first LoRA and compiling"
        ) from err


class SlotTarget(Protocol):
    """What the names write to: :class:`~loraswap.AdapterSlots` or :class:`~loraswap.diffusers.PipelineSlots`."""

    def blend(self, weights: BlendWeights) -> None: ...

    def unload(self, slot: int = 0) -> None: ...


class NamedAdapters:
    """diffusers' adapter names -> slots, with the weights ``set_adapters`` gave and the enabled flag."""

    def __init__(self, slot_count: int) -> None:
        self.slot_count = slot_count
        self.target: SlotTarget | None = None
        self.by_name: dict[str, int] = {}
        self.weights: dict[str, float] = {}  # active adapters and their weights
        self.enabled = True
        self.last: str | None = None
        self.call_scale = 1.0  # the strength of the current forward (diffusers' per-call ``scale``)
        self.fused = False  # fuse_lora merged the active adapters into the base weights (see .fusing)

    def slot_for_load(self, adapter_name: str | None, hotswap: bool) -> tuple[str, int]:
        """The name and slot a load writes, raising diffusers' ``ValueError`` where diffusers does."""
        self.check_not_fused("load_lora_weights")
        if hotswap:
            name = adapter_name or self.last
            if name not in self.by_name:
                raise ValueError(
                    f"Trying to hotswap LoRA adapter '{name}' but there is no existing adapter by that name. "
                    "Please choose an existing adapter name or set `hotswap=False` to prevent hotswapping."
                )
            return name, self.by_name[name]
        name = adapter_name or f"default_{len(self.by_name)}"
        if name in self.by_name:
            raise ValueError(f"Adapter name {name} already in use in the model - please select a new adapter name.")
        free = [slot for slot in range(self.slot_count) if slot not in self.by_name.values()]
        if not free:
            raise SlotError(
                f"all {self.slot_count} slot(s) hold adapters ({sorted(self.by_name)}); pass hotswap=True with "
                "adapter_name to replace one, delete one, or enable_lora_hotswap(..., slots=N) for more"
            )
        return name, free[0]

    def loaded(self, name: str, slot: int, hotswap: bool) -> None:
        """Record a completed load; a new adapter becomes the only active one, as in diffusers."""
        self.by_name[name] = slot
        self.last = name
        if not hotswap or not self.weights:
            self.weights = {name: 1.0}
        self.write()

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: Any = None) -> None:
        self.check_not_fused("set_adapters")
        names = self._known([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        if adapter_weights is None:
            adapter_weights = [1.0] * len(names)
        elif not isinstance(adapter_weights, Sequence):
            adapter_weights = [adapter_weights] * len(names)
        if len(adapter_weights) != len(names):
            raise ValueError(
                f"Length of adapter names {len(names)} is not equal to the length of their weights "
                f"{len(adapter_weights)}."
            )
        if any(weight is not None and not isinstance(weight, (int, float)) for weight in adapter_weights):
            raise HotswapError(
                "per-component or per-block adapter_weights (dicts) are not supported by loraswap's drop-in; "
                "pass one float per adapter"
            )
        self.weights = {name: 1.0 if w is None else float(w) for name, w in zip(names, adapter_weights)}
        self.write()

    def delete(self, adapter_names: str | Sequence[str]) -> None:
        self.check_not_fused("delete_adapters")
        for name in self._known([adapter_names] if isinstance(adapter_names, str) else list(adapter_names)):
            self.target.unload(self.by_name.pop(name))
            self.weights.pop(name, None)
            if self.last == name:
                self.last = None
        self.write()

    def unload_all(self) -> None:
        self.fused = False  # fused weights stay, as diffusers keeps them: the drop-in forgets their pristine copy
        if self.target is not None:
            for slot in sorted(set(self.by_name.values())):
                self.target.unload(slot)
        self.by_name.clear()
        self.weights.clear()
        self.last = None
        self.write()

    def enable(self, enabled: bool) -> None:
        self.check_not_fused("enable_lora" if enabled else "disable_lora")
        self.enabled = enabled
        self.write()

    def scale_call(self, scale: float) -> None:
        """Every weight times ``scale`` from the next forward on (a routing write, only when it changes)."""
        if self.fused and scale != 1.0:
            raise ModeError(
                f"a LoRA scale of {scale} was passed, but fuse_lora merged the LoRA at its own lora_scale; call "
                "unfuse_lora() for per-call strengths, or fuse_lora(lora_scale=...) at the strength you want"
            )
        if scale != self.call_scale:
            self.call_scale = scale
            if not self.fused:  # fused: the routing stays empty until unfuse_lora writes it back
                self.write()

    def fused_weights(self, adapter_names: Sequence[str] | None, lora_scale: float) -> dict[int, float]:
        """Slot -> weight that ``fuse_lora`` merges: the active adapters (or ``adapter_names``) at their
        ``set_adapters`` weights, times ``lora_scale``."""
        self.check_not_fused("fuse_lora")
        names = self.active() if adapter_names is None else self._known(list(adapter_names))
        return {self.by_name[name]: self.weights.get(name, 1.0) * float(lora_scale) for name in names}

    def check_not_fused(self, verb: str) -> None:
        if self.fused:
            raise ModeError(
                f"{verb}: the LoRA is fused into the base weights; call unfuse_lora() first (or unload_lora_weights() "
                "to keep the fused weights and drop the adapters)"
            )

    def active(self) -> list[str]:
        return [name for name in self.weights if name in self.by_name] if self.enabled else []

    def write(self) -> None:
        """The active adapters' weights (times the call's scale) into the routing, or none when disabled."""
        if self.target is None:
            return
        weights = {
            self.by_name[name]: weight * self.call_scale for name, weight in self.weights.items() if name in self.by_name
        }
        self.target.blend(weights if self.enabled else {})

    def _known(self, names: list[str]) -> list[str]:
        for name in names:
            if name not in self.by_name:
                raise ValueError(
                    f"Adapter name(s) {{'{name}'}} not in the list of present adapters: {set(self.by_name)}."
                )
        return names


def check_enable(modules: Mapping[str, nn.Module], check_compiled: str) -> bool:
    """diffusers' ``enable_lora_hotswap`` checks: True when some module already holds PEFT adapters (to take over).

    As in diffusers: with adapters loaded, ``check_compiled`` must be one of "error" (raise
    ``RuntimeError``), "warn" (log diffusers' warning) or "ignore".
    """
    from diffusers.loaders.peft import logger

    if not any(getattr(module, "peft_config", None) for module in modules.values()):
        return False
    if check_compiled == "error":
        raise RuntimeError("Call `enable_lora_hotswap` before loading the first adapter.")
    if check_compiled == "warn":
        logger.warning(
            "It is recommended to call `enable_lora_hotswap` before loading the first adapter to avoid recompilation."
        )
    elif check_compiled != "ignore":
        raise ValueError(
            f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead."
        )
    return True


def take_over_peft_adapters(module: nn.Module, source: str) -> dict[str, Adapter]:
    """Read every PEFT adapter ``module`` holds (name -> :class:`Adapter`), then put its base layers back."""
    from peft import get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    configs = dict(getattr(module, "peft_config", {}) or {})
    adapters = {}
    for name, config in configs.items():
        state_dict = get_peft_model_state_dict(module, adapter_name=name)
        config_dict = {key: _plain(value) for key, value in config.to_dict().items() if value is not None}
        adapters[name] = adapter_from_state_dict(state_dict, config_dict, source=f"{source}:{name}")
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(parent, child_name, child.get_base_layer())
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if attribute in vars(module):
            delattr(module, attribute)
    return adapters


def _plain(value: Any) -> Any:
    """A PEFT config value as its saved JSON holds it (enums as values, sets as sorted lists)."""
    if isinstance(value, Enum):
        return value.value
    return sorted(value) if isinstance(value, (set, frozenset)) else value
