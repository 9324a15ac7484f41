"""Tiny random-init models and synthetic PEFT adapters, for the demo, the benchmarks and the tests.

Nothing here downloads: models are built from transformers configs with random weights, and
adapters are written by PEFT itself (``get_peft_model`` + ``save_pretrained``), so they are
exactly what a user's training run would produce.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(hidden: int = 64, layers: int = 2, vocab: int = 128, seed: int = 0, **overrides: Any) -> nn.Module:
    """A random-init ``LlamaForCausalLM`` in eval mode (fp32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 32, 2),
        num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=512,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def llama_tp_plan(layers: int) -> dict[str, Any]:
    """The standard tensor-parallel plan for a Llama, for ``parallelize_module``: the embedding vocab-parallel
    (rowwise, ids replicated), q/k/v and gate/up colwise, o and down rowwise; the head stays replicated."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {"self_attn.o_proj": RowwiseParallel, "mlp.down_proj": RowwiseParallel}
    colwise = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    styles.update(dict.fromkeys(colwise, ColwiseParallel))
    plan = {f"model.layers.{layer}.{name}": style() for layer in range(layers) for name, style in styles.items()}
    return {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()), **plan}


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A tiny random GPT-2 (transformers' ``Conv1D`` layers): hidden 32, 2 layers, vocab 64."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()


def write_peft_adapter(base: nn.Module, path: str | Path, seed: int = 0, **lora_config: Any) -> Path:
    """Write a PEFT LoRA adapter for ``base`` with random (non-zero) A and B to ``path``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **lora_config)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    _shrink_lora_weights(peft_model)
    peft_model.save_pretrained(str(path))
    return Path(path)


def _shrink_lora_weights(peft_model: nn.Module, std: float = 0.05) -> None:
    """Give LoRA factors a realistic magnitude so deltas stay well inside fp32 tolerance."""
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)


def write_dora_adapter(base: nn.Module, path: str | Path, seed: int = 0, **lora_config: Any) -> Path:
    """A PEFT DoRA adapter (``use_dora=True``): random A and B, and magnitudes moved off ``||W + s*B*A||`` by up to
    25% (as training leaves them; at the norm, DoRA would equal plain LoRA and a comparison could not tell)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, use_dora=True, **lora_config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * (torch.rand_like(param) - 0.5))
            elif "lora_" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(str(path))
    return Path(path)


def write_adapters(base: nn.Module, directory: str | Path, specs: Mapping[str, Mapping[str, Any]]) -> dict[str, Path]:
    """``{name: LoraConfig kwargs}`` -> ``{name: adapter directory}``, each with its own seed."""
    directory = Path(directory)
    return {
        name: write_peft_adapter(base, directory / name, seed=index + 1, **spec)
        for index, (name, spec) in enumerate(specs.items())
    }


def peft_reference(base: nn.Module, adapter_path: str | Path) -> nn.Module:
    """PEFT's own eager model with the adapter loaded: the reference loraswap must match."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_path)).eval()


def peft_multi_adapter(base: nn.Module, paths: Mapping[str, str | Path]) -> nn.Module:
    """One PEFT model holding every adapter under its own name (the reference for mixed batches)."""
    from peft import PeftModel

    names = list(paths)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    return model.eval()


def merged_reference(peft_model: nn.Module, base: nn.Module, weights: Mapping[str, float]) -> nn.Module:
    """The base model with ``sum_name weight * delta_name`` added to each target weight, computed by PEFT."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            target = merged.get_submodule(name)
            for adapter, weight in weights.items():
                if adapter in module.lora_A or adapter in module.lora_embedding_A:
                    target.weight += weight * module.get_delta_weight(adapter)
    return merged.eval()


CATALOGUE_RANKS = (4, 8, 16, 32, 64)
CATALOGUE_TARGETS = (
    LLAMA_PROJECTIONS,
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("gate_proj", "up_proj", "down_proj"),
    ("q_proj", "v_proj", "down_proj"),
)


def write_catalogue(base: nn.Module, directory: str | Path, count: int, seed: int = 0) -> dict[str, Path]:
    """``count`` PEFT LoRA adapters for ``base`` (ranks 4-64, five target sets), ``{"adapter-0000": dir, ...}``.

    Each is what ``get_peft_model(...).save_pretrained`` writes (PEFT's keys, PEFT's own
    ``LoraConfig.save_pretrained``), with random factors, but without building a PEFT model per
    adapter: a catalogue of hundreds is written in seconds. Adapter ``i`` has rank
    ``CATALOGUE_RANKS[i % 5]`` and targets ``CATALOGUE_TARGETS[(i // 5) % 5]``, so every 25
    consecutive adapters cover every combination; adapter 0 targets every projection.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    directory = Path(directory)
    generator = torch.Generator().manual_seed(seed)
    linears = [(name, module) for name, module in base.named_modules() if isinstance(module, nn.Linear)]
    paths = {}
    for index in range(count):
        rank = CATALOGUE_RANKS[index % len(CATALOGUE_RANKS)]
        targets = CATALOGUE_TARGETS[(index // len(CATALOGUE_RANKS)) % len(CATALOGUE_TARGETS)]
        tensors = {}
        for name, module in linears:
            if name.rsplit(".", 1)[-1] in targets:
                prefix = f"base_model.model.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.05
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.05
        path = directory / f"adapter-{index:04d}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)).save_pretrained(str(path))
        paths[path.name] = path
    return paths


WORDS = ("the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "warm", "up", "hello", "world")


def tiny_tokenizer(vocab: int = 96):
    """A word-level ``PreTrainedTokenizerFast`` built offline: special tokens, a few words, filler ``w<i>`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = [*specials, *WORDS]
    words += [f"w{index}" for index in range(vocab - len(words))]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama_folder(path: str | Path, hidden: int = 64, layers: int = 2, vocab: int = 96, seed: int = 0) -> Path:
    """``save_pretrained`` a tiny Llama with :func:`tiny_tokenizer` beside it: a model folder to serve."""
    tokenizer = tiny_tokenizer(vocab)
    model = tiny_llama(
        hidden=hidden, layers=layers, vocab=vocab, seed=seed,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return Path(path)
