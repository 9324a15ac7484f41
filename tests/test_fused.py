"""Fused mode: adapters merged into the base weights' own storage, checked against PEFT's eager and merged models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_layer_types import tiny_gpt2
from torch import nn

import loraswap
from loraswap.errors import CapacityError, ModeError, NonFiniteError, SlotError
from loraswap.fused import FusedSlots
from loraswap.testing.synthetic import peft_reference, tiny_llama, write_adapters

ATOL = 1e-4


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    changed = [name for name, tensor in state.items() if not torch.equal(tensor, expected[name])]
    assert not changed, f"tensors changed: {changed[:5]}"


def peft_outputs(base: nn.Module, path, inputs: torch.Tensor, output=lambda out: out.logits):
    """PEFT's eager output with the adapter, and the output of PEFT's merged (merge_and_unload) model."""
    with torch.no_grad():
        reference = peft_reference(base, path)
        eager = output(reference(inputs))
        merged = output(reference.merge_and_unload()(inputs))
    return eager, merged


@pytest.fixture(scope="module")
def fused_llama(llama_base, llama_adapters, llama_tokens):
    """A compiled tiny Llama in fused mode with two slots, compiled once with slot 0 empty."""
    model = copy.deepcopy(llama_base)
    fused = loraswap.attach(
        model, loraswap.Capacity.for_adapters(llama_adapters.values(), model=model, slots=2), mode="fused"
    )
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled_base_logits = compiled(llama_tokens).logits
    return model, fused, compiled, compiled_base_logits


@pytest.fixture(scope="module")
def llama_references(llama_base, llama_adapters, llama_tokens):
    return {name: peft_outputs(llama_base, path, llama_tokens) for name, path in llama_adapters.items()}


def test_fused_matches_peft_eager_and_merged_without_recompiles(
    fused_llama, llama_base, llama_adapters, llama_tokens, llama_references
):
    model, fused, compiled, compiled_base_logits = fused_llama
    assert isinstance(fused, FusedSlots)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    with torch.no_grad():
        base_logits = llama_base(llama_tokens).logits
    order = list(llama_adapters) * 2
    with torch.no_grad(), loraswap.no_recompile():
        for name in order:
            fused.load(llama_adapters[name])
            logits = compiled(llama_tokens).logits
            eager, merged = llama_references[name]
            assert not torch.allclose(eager, base_logits, atol=1e-3), f"{name} does not change the output"
            torch.testing.assert_close(logits, eager, atol=ATOL, rtol=0)
            torch.testing.assert_close(logits, merged, atol=ATOL, rtol=0)
        fused.unload()
        assert torch.equal(compiled(llama_tokens).logits, compiled_base_logits)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert_bit_identical(model, llama_base.state_dict())


def test_staged_slot_changes_nothing_until_activated(
    fused_llama, llama_base, llama_adapters, llama_tokens, llama_references
):
    model, fused, compiled, _ = fused_llama
    first, second = llama_adapters["attn-r2"], llama_adapters["mlp-r32-rslora"]
    fused.activate(0)
    fused.load(first, slot=0)
    before = snapshot(model)
    fused.load(second, slot=1)
    assert_bit_identical(model, before)
    assert fused.loaded[0].startswith(str(first)) and fused.loaded[1].startswith(str(second))
    with torch.no_grad(), loraswap.no_recompile():
        fused.activate(1)
        torch.testing.assert_close(
            compiled(llama_tokens).logits, llama_references["mlp-r32-rslora"][0], atol=ATOL, rtol=0
        )
        fused.activate(0)
        assert_bit_identical(model, before)
    fused.unload(1)
    fused.unload(0)
    assert fused.loaded == {}
    assert_bit_identical(model, llama_base.state_dict())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["load", "activate", "unload"]), st.integers(0, 1), st.integers(0, 3)),
        min_size=1,
        max_size=8,
    )
)
def test_any_sequence_merges_from_pristine_and_unload_restores_bit_for_bit(llama_base, llama_adapters, steps):
    """After any sequence, the weights equal a fresh merge of the active slot's adapter (no drift), and
    emptying the active slot gives the base weights bit for bit."""
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity.for_adapters(llama_adapters.values(), slots=2)
    fused = loraswap.attach(model, capacity, mode="fused")
    paths = list(llama_adapters.values())
    staged: dict[int, int] = {}
    for verb, slot, adapter in steps:
        if verb == "load":
            fused.load(paths[adapter], slot=slot)
            staged[slot] = adapter
        elif verb == "activate":
            fused.activate(slot)
        else:
            fused.unload(slot)
            staged.pop(slot, None)
    assert set(fused.loaded) == set(staged)
    expected_model = copy.deepcopy(llama_base)
    fresh = loraswap.attach(expected_model, capacity, mode="fused")
    if fused.active in staged:
        fresh.load(paths[staged[fused.active]])
    assert_bit_identical(model, expected_model.state_dict())
    fused.unload(fused.active)
    assert_bit_identical(model, llama_base.state_dict())


def _overflowing(adapter: loraswap.Adapter, layer_name: str) -> loraswap.Adapter:
    """``adapter`` with finite factors on ``layer_name`` whose product overflows float32."""
    layers = dict(adapter.layers)
    layer = layers[layer_name]
    layers[layer_name] = dataclasses.replace(
        layer, lora_A=torch.full_like(layer.lora_A, 1e20), lora_B=torch.full_like(layer.lora_B, 1e20)
    )
    return loraswap.Adapter(layers, source="overflowing")


def _with_nan(adapter: loraswap.Adapter) -> loraswap.Adapter:
    layers = dict(adapter.layers)
    name = max(layers)
    lora_B = layers[name].lora_B.clone()
    lora_B[0, 0] = float("nan")
    layers[name] = dataclasses.replace(layers[name], lora_B=lora_B)
    return loraswap.Adapter(layers, source="nan")


def test_failed_loads_leave_the_weights_bit_identical(llama_base, llama_adapters, tmp_path):
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity(max_rank=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    fused = loraswap.attach(model, capacity, mode="fused")
    fused.load(llama_adapters["attn-r2"])
    before = snapshot(model)
    written_last = list(fused.targets)[-1]
    attention = loraswap.load_adapter(llama_adapters["mixed-patterns"])
    attention = loraswap.Adapter({n: l for n, l in attention.layers.items() if "mlp" not in n}, source="attention")
    assert written_last in attention.layers, "the overflow must hit the last layer the merge writes"
    too_big = write_adapters(llama_base, tmp_path, {"q-r32": dict(r=32, target_modules=["q_proj"])})["q-r32"]
    failures = [
        (NonFiniteError, _overflowing(attention, written_last), "merged weight is not finite"),
        (NonFiniteError, _with_nan(attention), "NaN"),
        (CapacityError, llama_adapters["mlp-r32-rslora"], "did not give it slots"),
        (CapacityError, too_big, "rank 32 exceeds the capacity's rank 16"),
    ]
    for error, source, message in failures:
        with pytest.raises(error, match=message):
            fused.load(source)
        assert_bit_identical(model, before)
    assert fused.loaded[0].startswith(str(llama_adapters["attn-r2"]))
    fused.unload()
    assert_bit_identical(model, llama_base.state_dict())


def test_route_blend_and_bad_slots_raise(fused_llama, llama_adapters):
    _, fused, _, _ = fused_llama
    with pytest.raises(ModeError, match="route\\(\\) is not available in fused mode"):
        fused.route([0, 1])
    with pytest.raises(ModeError, match="blend\\(\\) is not available in fused mode"):
        fused.blend({0: 0.5, 1: 0.5})
    with pytest.raises(SlotError, match="slot 2 is outside the 2 slot"):
        fused.load(llama_adapters["attn-r2"], slot=2)


def test_pristine_copy_costs_the_targeted_weights_once(llama_base, llama_adapters):
    model = copy.deepcopy(llama_base)
    fused = loraswap.attach(
        model, loraswap.Capacity(max_rank=8, target_modules=["q_proj", "embed_tokens"]), mode="fused"
    )
    targeted = [m.weight for n, m in model.named_modules() if n.endswith(("q_proj", "embed_tokens"))]
    assert fused.pristine_nbytes == sum(w.numel() * w.element_size() for w in targeted)
    assert "pristine_bytes" in repr(fused)


def test_attach_twice_is_refused(llama_base):
    capacity = loraswap.Capacity(max_rank=4, target_modules=["q_proj"])
    model = copy.deepcopy(llama_base)
    loraswap.attach(model, capacity, mode="fused")
    for mode in ("fused", "slots"):
        with pytest.raises(loraswap.HotswapError, match="attach once per model"):
            loraswap.attach(model, capacity, mode=mode)
    slotted = copy.deepcopy(llama_base)
    loraswap.attach(slotted, capacity)
    with pytest.raises(loraswap.HotswapError, match="attach once per model"):
        loraswap.attach(slotted, capacity, mode="fused")


class ConvNet(nn.Module):
    """Embedding, Conv1d, Conv2d, Conv3d (strided, padded) and Linear with bias, all mergeable."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.conv1d = nn.Conv1d(8, 8, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(8, 6, kernel_size=3, padding=1)
        self.conv3d = nn.Conv3d(6, 6, kernel_size=(1, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1))
        self.head = nn.Linear(6, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv1d(self.embed(tokens).transpose(1, 2)))
        image = torch.relu(self.conv2d(hidden.unsqueeze(-1).expand(-1, -1, -1, 4)))
        volume = torch.relu(self.conv3d(image.unsqueeze(2)))
        return self.head(volume.mean(dim=(2, 3, 4)))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


CONV_ADAPTERS = {
    "all-r4-bias": dict(r=4, lora_alpha=8, target_modules=["conv1d", "conv2d", "conv3d", "head"], lora_bias=True),
    "embed-convs-r6": dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["embed", "conv2d", "conv3d"]),
}
GPT2_ADAPTERS = {
    "c_attn-r4": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    "all-r12-bias": dict(
        r=12, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, lora_bias=True
    ),
}


@pytest.mark.parametrize(
    ("build", "specs", "output"),
    [(conv_net, CONV_ADAPTERS, lambda out: out), (tiny_gpt2, GPT2_ADAPTERS, lambda out: out.logits)],
    ids=["embedding-convNd-linear", "gpt2-conv1d"],
)
def test_layer_types_match_peft_eager_and_merged(tmp_path, build, specs, output):
    base = build()
    paths = write_adapters(base, tmp_path, specs)
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    references = {name: peft_outputs(base, path, tokens, output) for name, path in paths.items()}
    model = copy.deepcopy(base)
    fused = loraswap.attach(model, loraswap.Capacity.for_adapters(paths.values(), model=model), mode="fused")
    assert fused.capacity.lora_bias
    compiled = torch.compile(model, backend="aot_eager")  # inductor: the fused_llama fixture
    with torch.no_grad():
        base_output = output(compiled(tokens))
        with loraswap.no_recompile():
            for name in list(paths) * 2:
                fused.load(paths[name])
                result = output(compiled(tokens))
                eager, merged = references[name]
                assert not torch.allclose(eager, base_output, atol=1e-3)
                torch.testing.assert_close(result, eager, atol=ATOL, rtol=0)
                torch.testing.assert_close(result, merged, atol=ATOL, rtol=0)
    fused.unload()
    assert_bit_identical(model, base.state_dict())


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), "groups=2"),
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2), "dilation=\\(2, 2\\)"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    ],
    ids=["grouped", "dilated", "reflect-padded"],
)
def test_convs_that_cannot_hold_a_merged_lora_are_refused(layer, message):
    model = nn.Sequential(nn.Conv2d(4, 4, 1), layer)
    before = snapshot(model)
    with pytest.raises(ModeError, match=f"layer '1' cannot take a merged LoRA: .*{message}.*mode='slots'"):
        loraswap.attach(model, loraswap.Capacity(max_rank=4, target_modules=["0", "1"]), mode="fused")
    assert_bit_identical(model, before)
    loraswap.attach(model, loraswap.Capacity(max_rank=4, target_modules=["0"]), mode="fused")


def test_tied_weights_are_refused():
    model = tiny_llama(hidden=16, layers=1, vocab=32, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ModeError, match="'model.embed_tokens': its weight is shared with \\['lm_head.weight'\\]"):
        loraswap.attach(model, loraswap.Capacity(max_rank=4, target_modules=["embed_tokens"]), mode="fused")


def test_lora_bias_on_a_bias_free_layer_is_refused_before_any_write(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 4, bias=False)).eval()
    path = write_adapters(base, tmp_path, {"bias": dict(r=2, target_modules=["0", "1"], lora_bias=True)})["bias"]
    model = copy.deepcopy(base)
    fused = loraswap.attach(
        model, loraswap.Capacity(max_rank=2, target_modules=["0", "1"], lora_bias=True), mode="fused"
    )
    with pytest.raises(CapacityError, match="layer '1': .* has a LoRA bias but the base layer has no bias"):
        fused.load(path)
    assert_bit_identical(model, base.state_dict())


def test_prefetch_fills_the_cache_that_load_reads(llama_base, llama_adapters):
    model = copy.deepcopy(llama_base)
    fused = loraswap.attach(model, loraswap.Capacity.for_adapters(llama_adapters.values()), mode="fused")
    path = llama_adapters["embed-and-v"]
    prefetched = fused.prefetch(path).result()
    assert len(fused.cache) == 1 and fused.cache.nbytes == prefetched.nbytes > 0
    assert fused.packed(path) is prefetched
    before = snapshot(model)
    fused.load(path)
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert len(fused.cache) == 1


def test_load_packed_refuses_an_adapter_packed_for_another_model(llama_base, llama_adapters):
    """``pack``/``load_packed`` split a load in two; a packed adapter only fits the slots that packed it."""
    adapter = loraswap.load_adapter(llama_adapters["attn-r2"])
    capacity = loraswap.Capacity.for_adapters([llama_adapters["attn-r2"]])
    for mode in ("slots", "fused"):
        first = loraswap.attach(copy.deepcopy(llama_base), capacity, mode=mode)
        second = loraswap.attach(copy.deepcopy(llama_base), capacity, mode=mode)
        first.load_packed(first.pack(adapter))
        with pytest.raises(loraswap.SlotError, match="packed for another attached model"):
            second.load_packed(first.pack(adapter))
