"""Every supported layer type against PEFT: GPT-2's Conv1D, Embedding, Conv1d, grouped Conv2d, Conv3d."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import loraswap
from loraswap.layers import SlotLayer
from loraswap.testing.synthetic import peft_reference, write_adapters


class ConvZoo(nn.Module):
    """Embedding + Conv1d + grouped Conv2d + Conv3d + Linear, small enough to compile in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.conv1d = nn.Conv1d(12, 8, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=2)
        self.conv3d = nn.Conv3d(8, 6, kernel_size=(1, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1))
        self.head = nn.Linear(6, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens).transpose(1, 2)  # [B, 12, T]
        hidden = torch.relu(self.conv1d(hidden))  # [B, 8, T]
        image = hidden.unsqueeze(-1).expand(-1, -1, -1, 4)  # [B, 8, T, 4]
        image = torch.relu(self.conv2d(image))
        volume = torch.relu(self.conv3d(image.unsqueeze(2)))  # [B, 6, 1, T', 4]
        return self.head(volume.mean(dim=(2, 3, 4)))


ZOO_ADAPTERS = {
    "all-r4": dict(r=4, lora_alpha=8, target_modules=["embed", "conv1d", "conv2d", "conv3d", "head"]),
    "convs-r6-rslora": dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["conv2d", "conv3d"]),
    "patterns": dict(
        r=2,
        lora_alpha=2,
        target_modules=["embed", "conv1d", "conv2d"],
        rank_pattern={"conv2d": 8},
        alpha_pattern={"embed": 7},
    ),
}

GPT2_ADAPTERS = {
    "c_attn-r4": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    "all-r12": dict(r=12, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    "mlp-r2": dict(r=2, lora_alpha=2, target_modules=["c_fc"], fan_in_fan_out=True),
}


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()


def zoo() -> nn.Module:
    torch.manual_seed(0)
    return ConvZoo().eval()


@pytest.mark.parametrize(
    ("build", "specs", "output"),
    [(zoo, ZOO_ADAPTERS, lambda out: out), (tiny_gpt2, GPT2_ADAPTERS, lambda out: out.logits)],
    ids=["conv-zoo", "gpt2"],
)
def test_layer_types_match_peft_compiled_without_recompiles(tmp_path, build, specs, output):
    base = build()
    paths = write_adapters(base, tmp_path, specs)
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        references = {name: output(peft_reference(base, path)(tokens)) for name, path in paths.items()}
        base_output = output(base(tokens))
    # every adapter moves the output far more than the tolerance the comparisons below allow
    assert all((ref - base_output).abs().max() > 1e-4 for ref in references.values())
    model = copy.deepcopy(base)
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters(paths.values(), model=model))
    with torch.no_grad():
        assert torch.equal(output(model(tokens)), base_output)
        for name, path in paths.items():
            slots.load(path)
            torch.testing.assert_close(output(model(tokens)), references[name], atol=1e-5, rtol=0)
        compiled = torch.compile(model, backend="aot_eager")  # recompiles are dynamo's; inductor: test_core_llama
        compiled(tokens)
        pointers = [t.data_ptr() for t in model.buffers()]
        with loraswap.no_recompile():
            for name in [*paths, *reversed(paths)]:
                slots.load(paths[name])
                torch.testing.assert_close(output(compiled(tokens)), references[name], atol=1e-4, rtol=0)
    assert [t.data_ptr() for t in model.buffers()] == pointers


@pytest.mark.parametrize(
    ("build", "specs", "output"),
    [(zoo, ZOO_ADAPTERS, lambda out: out), (tiny_gpt2, GPT2_ADAPTERS, lambda out: out.logits)],
    ids=["conv-zoo", "gpt2"],
)
def test_routed_rows_gather_their_slot_in_every_layer_type(tmp_path, build, specs, output):
    """The default capacity over three slots gathers each row's slot in convolutions, Embedding and Conv1D."""
    base = build()
    paths = write_adapters(base, tmp_path, specs)
    tokens = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(0))
    ids = [2, -1, 0, 1]
    with torch.no_grad():
        references = [output(peft_reference(base, path)(tokens)) for path in paths.values()]
        base_output = output(base(tokens))
        expected = torch.stack([base_output[row] if s == -1 else references[s][row] for row, s in enumerate(ids)])
    model = copy.deepcopy(base)
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters(paths.values(), model=model, slots=len(paths)))
    assert all(layer.gathered for layer in model.modules() if isinstance(layer, SlotLayer))
    for slot, path in enumerate(paths.values()):
        slots.load(path, slot=slot)
    slots.route(ids)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(output(model(tokens)), expected, atol=1e-5, rtol=0)
        compiled(tokens)
        with loraswap.no_recompile():
            for mix in (ids[::-1], ids):
                slots.route(mix)
                result = output(compiled(tokens))
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)
