"""What loraswap cannot reproduce exactly, decided from an adapter's key names and config alone.

A slot layer computes ``base(x) + scaling * B(A(x))`` (plus PEFT's DoRA rescale, see :mod:`loraswap.dora`)
with the base weights untouched. An adapter that needs anything else (a Hadamard or Kronecker product, base
weights that training changed, ...) would load as a different model, so it is refused instead, with the
feature named, why a hot-swap cannot honour it, and what to do.

Every reading path asks this module: :func:`loraswap.inspect` lists what :func:`find_unsupported`
finds, and a load (``load_adapter``, the diffusers pipeline reader) raises on the first of them
(:func:`check_adapter_supported`) before reading a tensor, so the two always agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import AdapterFormatError, UnsupportedAdapterError

MERGE_FIX = "merge it into the base model (PEFT's merge_and_unload) and serve that model, or retrain it as plain LoRA"


@dataclass(frozen=True)
class Feature:
    """A feature a hot-swap cannot honour: its name, why, and what the user can do instead."""

    name: str
    why: str
    fix: str = MERGE_FIX


@dataclass(frozen=True)
class Unsupported:
    """One feature found in one adapter, with the key or config option that shows it."""

    feature: Feature
    evidence: str

    def message(self, where: str) -> str:
        feature = self.feature
        return f"{where}: {feature.name} ({self.evidence}) cannot be hot-swapped: {feature.why}; {feature.fix}"


DORA_SCALE = Feature(
    "DoRA in kohya/LyCORIS form (dora_scale)",
    "this reader takes PEFT-keyed files, where DoRA is PEFT's lora_magnitude_vector (served exactly); a dora_scale "
    "key comes from a kohya/LyCORIS/OneTrainer file, whose DoRA this reader does not convert; read as plain LoRA "
    "it would silently give another model",
    "convert it to PEFT's layout (lora_magnitude_vector per output feature), or merge it into the base model and "
    "serve that model",
)
LOHA = Feature("LyCORIS LoHa", "LoHa's update is a Hadamard product of two low-rank pairs, not one B*A")
LOKR = Feature("LyCORIS LoKr", "LoKr's update is a Kronecker product of two factors, not one B*A")
TUCKER = Feature("LyCORIS LoCon with a Tucker core (lora_mid)", "its conv update has a third factor, not one B*A")
OFT = Feature("OFT/BOFT", "OFT multiplies the base weight by a trained rotation instead of adding B*A")
IA3 = Feature("IA3", "IA3 scales activations by trained vectors instead of adding B*A")
VERA = Feature("VeRA", "VeRA scales shared frozen random matrices by trained vectors instead of adding B*A")
ADALORA = Feature("AdaLoRA", "AdaLoRA's update is P*diag(E)*Q with a trained singular-value vector, not B*A")
FULL_DIFF = Feature(
    "full weight differences (.diff / .diff_b)",
    "the file replaces base weights or biases outright, and slots never change the base model",
)
BFL_CONTROL = Feature(
    "the BFL Flux Control LoRA layout (Canny/Depth)",
    "besides LoRA factors it replaces norm scales and widens x_embedder's input channels, changes of base "
    "weights and shapes that a compiled model cannot take without recompiling",
    "load it with diffusers' own FluxControlPipeline.load_lora_weights, without hot-swapping",
)
MODULES_TO_SAVE = Feature(
    "modules_to_save",
    "PEFT saved whole trained copies of those modules, which replace the base model's; slots hold LoRA "
    "factors only and share one set of base weights",
)
TRAINED_BIAS = Feature(
    "trained base biases",
    "PEFT trained the base layers' own biases and saved them in the adapter; they replace the base model's, "
    "which slots never change",
    "retrain with bias='none' (lora_bias=True gives the LoRA its own bias, which loraswap serves), or merge it into "
    "the base model (PEFT's merge_and_unload) and serve that model",
)
SAVED_EMBEDDING = Feature(
    "trained embedding weights (save_embedding_layers)",
    "the file holds a whole embedding matrix (the vocabulary was resized or the embedding trained), which replaces "
    "the base model's; slots never change base weights",
    "load that embedding into the base model before attach and serve that model, or retrain without resizing",
)
TRAINABLE_TOKENS = Feature(
    "trainable_token_indices", "PEFT trained rows of the base embedding, which replace the base model's rows"
)
RESIDUAL_INIT = {
    "pissa": "PiSSA",
    "olora": "OLoRA",
    "corda": "CorDA",
    "lora_ga": "LoRA-GA",
}
CONVERSION_FIX = (
    "convert it to plain LoRA with PEFT: peft_model.save_pretrained(out_dir, "
    "path_initial_model_for_weight_conversion=<the adapter saved before training>); the converted adapter loads"
)
LOFTQ = Feature(
    "LoftQ initialisation (init_lora_weights='loftq')",
    "LoftQ replaced the base weights with a quantized residual, so the adapter is exact only on that modified base",
    "merge it into the LoftQ base model (PEFT's merge_and_unload) and serve that model, or retrain with "
    "init_lora_weights=True",
)
# PEFT config options that make an adapter more than plain LoRA (truthy value -> feature)
CONFIG_FEATURES = {
    "modules_to_save": MODULES_TO_SAVE,
    "trainable_token_indices": TRAINABLE_TOKENS,
    "layer_replication": Feature("layer_replication", "PEFT duplicated base layers: another model structure"),
    "target_parameters": Feature("target_parameters (LoRA on nn.Parameter)", "slots wrap modules, not bare parameters"),
    "alora_invocation_tokens": Feature(
        "activated LoRA (alora_invocation_tokens)", "the LoRA applies only after an invocation sequence in the input"
    ),
    "use_qalora": Feature("QALoRA (use_qalora=True)", "QALoRA pools the input groupwise before A"),
}
PEFT_TYPES = {"IA3": IA3, "VERA": VERA, "ADALORA": ADALORA, "LOHA": LOHA, "LOKR": LOKR, "OFT": OFT, "BOFT": OFT}
# A key segment (between dots) that starts with one of these belongs to a feature.
KEY_SEGMENT_FEATURES = (
    ("dora_scale", DORA_SCALE),
    ("hada_", LOHA),
    ("lokr_", LOKR),
    ("lora_mid", TUCKER),
    ("oft_", OFT),
    ("boft_", OFT),
    ("ia3_", IA3),
    ("vera_lambda", VERA),
    ("lora_E", ADALORA),
    ("modules_to_save", MODULES_TO_SAVE),
    ("trainable_tokens", TRAINABLE_TOKENS),
)
# a dot-separated segment that starts with one of the prefixes: one search per key
_FEATURE_SEGMENT = re.compile(r"(?:^|\.)(" + "|".join(re.escape(prefix) for prefix, _ in KEY_SEGMENT_FEATURES) + ")")
_PREFIX_FEATURES = dict(KEY_SEGMENT_FEATURES)
# the same segments in keys joined by newlines: a few substring tests over a whole file's keys
_SEGMENT_PREFIXES = tuple(prefix for prefix, _ in KEY_SEGMENT_FEATURES)
_SEGMENT_NEEDLES = tuple(separator + prefix for prefix in _SEGMENT_PREFIXES for separator in ".\n")
# the keys of a plain LoRA layer: they show a feature only through a segment (see key_feature)
_PLAIN_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
FULL_DIFF_SEGMENTS = ("diff", "diff_b")
# PEFT's EMBEDDING_LAYER_NAMES: whole weights of these modules in a LoRA file are saved embeddings.
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out", "shared")
BASE_LAYER_WEIGHT = ".base_layer.weight"


def key_feature(key: str) -> Feature | None:
    """The feature a single key shows, or None for a key that shows none (a LoRA key, or an unknown one)."""
    segment = _FEATURE_SEGMENT.search(key)
    if segment is not None:  # the first such segment, and the first prefix in KEY_SEGMENT_FEATURES it starts with
        return _PREFIX_FEATURES[segment.group(1)]
    owner, _, last = key.rpartition(".")
    if last in FULL_DIFF_SEGMENTS:
        return FULL_DIFF
    if key.endswith(("query_norm.scale", "key_norm.scale")):
        return BFL_CONTROL
    if "lora" in key.lower() or key.endswith(BASE_LAYER_WEIGHT):  # "lora" in some segment ("lora" holds no dot)
        return None
    if last == "bias":
        return TRAINED_BIAS
    if last == "weight" and owner.rpartition(".")[2] in EMBEDDING_NAMES:
        return SAVED_EMBEDDING
    return None


def unsupported_in_keys(keys: Iterable[str]) -> list[Unsupported]:
    """One entry per feature the key names show, with the first key that shows it."""
    keys = list(keys)
    joined = "\n".join(keys)
    if not joined.startswith(_SEGMENT_PREFIXES) and not any(needle in joined for needle in _SEGMENT_NEEDLES):
        keys = [key for key in keys if not key.endswith(_PLAIN_LORA_SUFFIXES)]  # no key has a feature segment
    found: dict[str, Unsupported] = {}
    for key in keys:
        feature = key_feature(key)
        if feature is not None and feature.name not in found:
            found[feature.name] = Unsupported(feature, f"key {key!r}")
    return list(found.values())


def unsupported_in_config(config: Mapping[str, Any]) -> list[Unsupported]:
    """One entry per PEFT config option that makes the adapter more than plain LoRA."""
    found = []
    peft_type = str("LORA" if config.get("peft_type") is None else config["peft_type"]).upper()
    if peft_type != "LORA":
        feature = PEFT_TYPES.get(peft_type) or Feature(
            f"PEFT type {peft_type!r}", f"{peft_type!r} is not LoRA: it does not add one low-rank update B*A to a layer"
        )
        found.append(Unsupported(feature, f"peft_type={config['peft_type']!r}"))
    for option, feature in CONFIG_FEATURES.items():
        if config.get(option):
            found.append(Unsupported(feature, f"{option}={config[option]!r}"))
    if config.get("use_dora") and config.get("lora_bias"):
        feature = Feature(
            "DoRA with lora_bias",
            "PEFT itself rejects use_dora=True with lora_bias=True (its LoraConfig raises), so no reference exists",
            "retrain with one of use_dora or lora_bias",
        )
        found.append(Unsupported(feature, "use_dora=True, lora_bias=True"))
    if config.get("bias") in ("all", "lora_only"):
        found.append(Unsupported(TRAINED_BIAS, f"bias={config['bias']!r}"))
    init = config.get("init_lora_weights")
    if isinstance(init, str):
        method = next((name for prefix, name in RESIDUAL_INIT.items() if init.lower().startswith(prefix)), None)
        if method is not None:
            feature = Feature(
                f"a raw {method} adapter",
                f"{method} initialisation subtracts the initial adapter from the base weights, so the adapter as "
                "saved is exact only on that modified base (on the original base it is off by the initial adapter)",
                CONVERSION_FIX,
            )
            found.append(Unsupported(feature, f"init_lora_weights={init!r}"))
        elif init.lower() == "loftq":
            found.append(Unsupported(LOFTQ, f"init_lora_weights={init!r}"))
    return found


def find_unsupported(keys: Iterable[str], configs: Iterable[Mapping[str, Any]] = ()) -> list[Unsupported]:
    """Every feature that the configs (first) and the key names show, each once."""
    found: dict[str, Unsupported] = {}
    for item in [u for config in configs for u in unsupported_in_config(config)] + unsupported_in_keys(keys):
        found.setdefault(item.feature.name, item)
    return list(found.values())


def refuse_unsupported(keys: Iterable[str], configs: Iterable[Mapping[str, Any]], where: str) -> None:
    """Raise :class:`UnsupportedAdapterError` for the first feature found, naming the others too."""
    found = find_unsupported(keys, configs)
    if found:
        others = "; ".join(item.feature.name for item in found[1:])
        also = f" (the adapter also has: {others})" if others else ""
        raise UnsupportedAdapterError(found[0].message(where) + also)


def check_adapter_supported(keys, config: Mapping[str, Any] | None, where: str) -> None:
    """Raise before any tensor is read: :class:`AdapterFormatError` for a damaged config, then
    :class:`UnsupportedAdapterError` for a feature the config or the key names show (DoRA, IA3, PiSSA, ...)."""
    if config:
        check_config_fields(config, where)
    refuse_unsupported(keys, [config] if config else [], where)


def check_config_fields(config: Mapping[str, Any], where: str) -> None:
    """Raise :class:`AdapterFormatError` for a LoRA config field of the wrong type or range (before any use of it)."""

    def bad(option: str, expected: str) -> AdapterFormatError:
        return AdapterFormatError(
            f"{where}: the adapter config's {option} is {config[option]!r}; expected {expected}. "
            "The config is damaged or belongs to another tool: re-save the adapter with PEFT"
        )

    if "r" in config and not _is_rank(config["r"]):
        raise bad("r", "a positive integer")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise bad("lora_alpha", "a finite number")
    patterns = (("rank_pattern", _is_rank, "positive integers"), ("alpha_pattern", _is_number, "numbers"))
    for option, valid, expected in patterns:
        pattern = config.get(option)
        if pattern is not None and not (
            isinstance(pattern, Mapping) and all(isinstance(key, str) and valid(v) for key, v in pattern.items())
        ):
            raise bad(option, f"an object of module-name patterns to {expected}")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not _is_string_list(targets):
        raise bad("target_modules", "a string or a list of strings")
    for option in ("use_rslora", "use_dora"):
        if option in config and config[option] is not None and not isinstance(config[option], bool):
            raise bad(option, "true or false")
    if config.get("peft_type") is not None and not isinstance(config["peft_type"], str):
        raise bad("peft_type", "a string such as 'LORA'")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_string_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(item, str) for item in value)


def names_of(found: Sequence[Unsupported]) -> tuple[str, ...]:
    """The feature names, as :class:`loraswap.AdapterInfo` lists them."""
    return tuple(item.feature.name for item in found)
