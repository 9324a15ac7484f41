"""Shared fixtures: tiny random-init models and PEFT-written adapters, built once per session."""

from __future__ import annotations

import warnings

import pytest
import torch

from loraswap.testing.synthetic import peft_multi_adapter, tiny_llama, write_adapters, write_dora_adapter

# Four adapters that differ in rank, alpha, targets (disjoint and overlapping, attention and MLP),
# rsLoRA, rank_pattern and alpha_pattern.
LLAMA_ADAPTERS = {
    "attn-r2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "mlp-r32-rslora": dict(r=32, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "mixed-patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
        rank_pattern={"o_proj": 4, "layers.1.self_attn.k_proj": 16},
        alpha_pattern={"down_proj": 3, "layers.0.self_attn.q_proj": 32},
    ),
    "embed-and-v": dict(r=16, lora_alpha=16, target_modules=["embed_tokens", "v_proj", "up_proj"]),
}

# A UNet LoRA as diffusers users train it (PEFT's LoraConfig on the attention and proj_in layers).
UNET_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]}


# DoRA adapters (PEFT use_dora) on the same tiny Llama: Linear and Embedding layers, magnitudes moved off the norm.
DORA_ADAPTERS = {
    "dora-a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "dora-b": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"]),
}


def pytest_configure(config):
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
    torch.set_num_threads(2)


# -- comparisons the tests share -------------------------------------------------------------------------------------


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (slot buffers included), to check a failed call changed nothing."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers(remove_duplicate=False))
    return {name: t.detach().clone() for name, t in tensors.items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every parameter and buffer bit-for-bit equal to :func:`snapshot`'s copy (invariant 2)."""
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def assert_outputs_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor], tokens, logits_before) -> None:
    """:func:`assert_unchanged`, and the model's logits for ``tokens`` bit-for-bit what they were."""
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, logits_before)


def state_dict_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict (what fused mode merges into and must restore)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_state_dict_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """The model's state dict bit-for-bit ``expected`` (a copy, or another model's state dict)."""
    state = model.state_dict()
    assert state.keys() == expected.keys()
    changed = [name for name, tensor in state.items() if not torch.equal(tensor, expected[name])]
    assert not changed, f"tensors changed: {changed[:5]}"


def pipeline_snapshot(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`snapshot` of every torch module of a diffusers pipeline."""
    return {name: snapshot(module) for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def assert_pipeline_unchanged(pipe, before: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            assert_unchanged(module, before[name])


# -- slot storage ------------------------------------------------------------------------------------------------


def slot_row(slots, slot: int) -> tuple[list[torch.Tensor], ...]:
    """``slot``'s (weights, scales, live masks), one row per group in each."""
    storage = slots.storage
    return tuple([tensor[slot] for tensor in part] for part in (storage.weights, storage.scales, storage.live))


def holds_rows_past_live(slots, slot: int) -> bool:
    """Whether some layer's ``lora_A`` in ``slot`` holds non-zero values in rank rows that are not live."""
    weights, scales, masks = slot_row(slots, slot)
    for name, place in slots.layout.placements.items():
        group = place.group
        lora_A, _, _, live, _ = slots.layout.views(weights[group], scales[group], masks[group], name)
        if lora_A[~live].any():
            return True
    return False


def sd_latents(pipe) -> torch.Tensor:
    """One denoising step of a tiny SD pipeline on a fixed prompt and seed, as latents (DoRA pipeline tests)."""
    with torch.no_grad():
        return pipe(
            "a cat", num_inference_steps=1, output_type="latent", height=16, width=16,
            generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip


@pytest.fixture(scope="session")
def llama_base():
    return tiny_llama(hidden=64, layers=2, vocab=96)


@pytest.fixture(scope="session")
def llama_adapters(llama_base, tmp_path_factory):
    return write_adapters(llama_base, tmp_path_factory.mktemp("llama-adapters"), LLAMA_ADAPTERS)


@pytest.fixture(scope="session")
def dora_adapters(llama_base, tmp_path_factory):
    directory = tmp_path_factory.mktemp("dora-adapters")
    return {
        name: write_dora_adapter(llama_base, directory / name, seed=10 + index, **spec)
        for index, (name, spec) in enumerate(DORA_ADAPTERS.items())
    }


@pytest.fixture(scope="session")
def names(llama_adapters):
    """The names of :data:`llama_adapters`, in order."""
    return list(llama_adapters)


@pytest.fixture(scope="session")
def peft_model(llama_base, llama_adapters):
    """PEFT's eager model holding every Llama adapter under its name: the reference for routed rows."""
    return peft_multi_adapter(llama_base, llama_adapters)


@pytest.fixture(scope="session")
def llama_tokens():
    return torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(1))
