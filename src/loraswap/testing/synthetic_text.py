"""Tiny random-init causal LMs of several architectures with a word-level tokenizer and a chat template,
built offline: what the text engine's tests and ``bench serve`` check against PEFT.

``tiny_causal_lm(arch)`` builds Llama, Qwen2, Qwen3, GPT-2 (transformers' ``Conv1D`` layers) or Gemma (tied
embeddings, scaled embeddings, GeGLU); ``TEXT_TARGETS[arch]`` are the layer names PEFT adapters target there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .synthetic import tiny_llama, tiny_tokenizer

# Each message between <s> and </s>, then <s> for the answer: words of the tiny tokenizer's vocabulary only.
CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s>{% endif %}"
)

TEXT_TARGETS = {
    "llama": [["q_proj", "v_proj"], ["gate_proj", "down_proj"], ["o_proj", "up_proj", "k_proj"]],
    "qwen2": [["q_proj", "v_proj"], ["gate_proj", "down_proj"], ["o_proj", "k_proj"]],
    "qwen3": [["q_proj", "v_proj"], ["gate_proj", "down_proj"], ["o_proj", "k_proj"]],
    "gemma": [["q_proj", "v_proj"], ["gate_proj", "down_proj"], ["o_proj", "up_proj"]],
    "gpt2": [["c_attn"], ["c_fc"], ["c_proj"]],
}


def tiny_causal_lm(arch: str, hidden: int = 64, layers: int = 2, vocab: int = 96, seed: int = 0):
    """A random-init causal LM of ``arch`` in eval mode and its tokenizer (ids match: pad 0, bos 1, eos 2)."""
    import transformers

    tokenizer = tiny_tokenizer(vocab)
    tokenizer.chat_template = CHAT_TEMPLATE
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "llama":
        return tiny_llama(hidden=hidden, layers=layers, vocab=vocab, seed=seed, **special), tokenizer
    torch.manual_seed(seed)
    heads = max(hidden // 32, 2)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), max_position_embeddings=512, **special)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(config)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=hidden // heads, **common)
        model = transformers.Qwen3ForCausalLM(config)
    elif arch == "gemma":
        config = transformers.GemmaConfig(head_dim=hidden // heads, initializer_range=0.3, **common)  # tied, scaled embeddings at 0.02 repeat the last token
        model = transformers.GemmaForCausalLM(config)
    elif arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **special)
        model = transformers.GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown arch {arch!r}; one of {', '.join(TEXT_TARGETS)}")
    return model.eval(), tokenizer


def tiny_causal_lm_folder(path: str | Path, arch: str = "llama", **sizes) -> Path:
    """``save_pretrained`` :func:`tiny_causal_lm` and its tokenizer (chat template included): a folder to serve."""
    model, tokenizer = tiny_causal_lm(arch, **sizes)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return Path(path)


def peft_greedy(base: torch.nn.Module, adapter_path, prompt_ids: list[int], max_new_tokens: int, scale: float = 1.0) -> list[int]:
    """PEFT's eager greedy ``generate`` with the adapter at ``adapter_path`` (None: the base) whose scaling is
    multiplied by ``scale``: the new token ids, up to and without the end-of-sequence token."""
    from peft.tuners.lora import LoraLayer

    from .synthetic import peft_reference

    model = base if adapter_path is None else peft_reference(base, adapter_path)
    if scale != 1.0:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.scale_layer(scale)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        output = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=base.config.pad_token_id,
        )
    new = output[0, ids.shape[1] :].tolist()
    eos = base.generation_config.eos_token_id
    return new[: new.index(eos)] if eos in new else new
