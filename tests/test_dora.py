"""DoRA (PEFT ``use_dora``) served exactly, against PEFT's own eager models: one slot and routed rows (compiled,
never recompiling across DoRA<->plain swaps), strengths, fused mode, and failed loads that change nothing."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import assert_unchanged, snapshot

import loraswap
from loraswap.errors import CapacityError, DoraStrengthError, NonFiniteError, ShapeMismatchError
from loraswap.testing.synthetic import peft_reference, write_dora_adapter

ROWS = 4


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 96, (ROWS, 7), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def sources(dora_adapters, llama_adapters):
    """Two DoRA adapters and a plain one (rank and alpha patterns) that overlaps their layers."""
    return {**dora_adapters, "plain": llama_adapters["mixed-patterns"]}


@pytest.fixture(scope="module")
def references(llama_base, sources, tokens):
    with torch.no_grad():
        outputs = {name: peft_reference(llama_base, path)(tokens).logits for name, path in sources.items()}
        outputs["base"] = llama_base(tokens).logits
    return outputs


def attached(llama_base, sources, **options):
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity.for_adapters(sources.values(), model=model, max_batch=ROWS, **options)
    return model, loraswap.attach(model, capacity)


def as_plain_lora(path) -> loraswap.Adapter:
    """The DoRA adapter's factors without its magnitudes: what a reader that ignored DoRA would serve."""
    adapter = loraswap.load_adapter(path)
    layers = {name: dataclasses.replace(layer, magnitude=None) for name, layer in adapter.layers.items()}
    return dataclasses.replace(adapter, layers=layers, config={})


def test_dora_is_not_plain_lora_so_these_tests_can_fail(llama_base, sources, references, tokens):
    model, slots = attached(llama_base, {"plain": sources["plain"]})
    for name in ("dora-a", "dora-b"):
        plain = as_plain_lora(sources[name])
        model, slots = attached(llama_base, {name: plain})
        slots.load(plain)
        with torch.no_grad():
            as_plain = model(tokens).logits
        assert not torch.allclose(as_plain, references[name], atol=1e-3)
        assert not torch.allclose(references["base"], references[name], atol=1e-3)


def test_capacity_and_inspect_report_dora(llama_base, sources):
    assert not loraswap.Capacity.for_adapters([sources["plain"]]).dora
    assert loraswap.Capacity.for_adapters(sources.values()).dora
    assert loraswap.Capacity.for_adapters([loraswap.load_adapter(sources["dora-a"])]).dora
    info = loraswap.inspect(sources["dora-a"])
    assert info.has_dora and not info.unsupported
    assert not loraswap.inspect(sources["plain"]).has_dora


def test_one_slot_compiled_swaps_dora_and_plain_match_peft_without_recompiling(llama_base, sources, references, tokens):
    model, slots = attached(llama_base, sources)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    slots.load(sources["dora-a"])
    with torch.no_grad():
        compiled(tokens)
        with loraswap.no_recompile():
            for name in ("dora-a", "plain", "dora-b", "dora-a", "plain"):
                slots.load(sources[name])
                torch.testing.assert_close(compiled(tokens).logits, references[name], atol=1e-5, rtol=0)
            slots.unload(0)
            assert torch.equal(compiled(tokens).logits, references["base"])


@pytest.mark.parametrize("max_blend", [1, 3], ids=["gathered", "dense"])
def test_routed_rows_mix_dora_plain_and_base_without_recompiling(
    llama_base, sources, references, tokens, max_blend
):
    model, slots = attached(llama_base, sources, slots=3, max_blend=max_blend)
    for slot, name in enumerate(("dora-a", "plain", "dora-b")):
        slots.load(sources[name], slot=slot)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    ids = [0, 1, -1, 2]
    slots.route(ids)
    with torch.no_grad():
        compiled(tokens)
        with loraswap.no_recompile():
            for swap in (None, "plain", "dora-a"):  # slot 0: DoRA -> plain -> DoRA, routed rows the same
                if swap is not None:
                    slots.load(sources[swap], slot=0)
                slots.route(ids)
                logits = compiled(tokens).logits
                expected = [swap or "dora-a", "plain", "base", "dora-b"]
                for row, name in enumerate(expected):
                    torch.testing.assert_close(logits[row], references[name][row], atol=1e-5, rtol=0)
                assert torch.equal(logits[2], references["base"][2])
            slots.activate(2)
            torch.testing.assert_close(compiled(tokens).logits, references["dora-b"], atol=1e-5, rtol=0)


def test_plain_and_base_rows_are_bit_for_bit_what_a_capacity_without_dora_gives(llama_base, sources, tokens):
    with_dora, dora_slots = attached(llama_base, sources, slots=2)
    without, plain_slots = attached(llama_base, {"plain": sources["plain"]}, slots=2)
    assert dora_slots.capacity.dora and not plain_slots.capacity.dora
    for slots in (dora_slots, plain_slots):
        slots.load(sources["plain"], slot=1)
    dora_slots.load(sources["dora-a"], slot=0)
    ids = [1, -1, 0, 1]
    with torch.no_grad():
        for model, slots in ((with_dora, dora_slots), (without, plain_slots)):
            slots.route(ids)
        got, expected = with_dora(tokens).logits, without(tokens).logits
    for row in (0, 1, 3):
        assert torch.equal(got[row], expected[row]), row
    dora_slots.unload(0)  # an empty slot: the base model, exactly
    dora_slots.activate(0)
    with torch.no_grad():
        assert torch.equal(with_dora(tokens).logits, llama_base(tokens).logits)


def test_dora_strength_other_than_one_is_refused_by_name(llama_base, sources, references, tokens):
    model, slots = attached(llama_base, sources, slots=2, max_blend=2)
    slots.load(sources["dora-a"], slot=0)
    slots.load(sources["plain"], slot=1)
    slots.activate(0)
    before = snapshot(model)
    with pytest.raises(DoraStrengthError, match="DoRA.*strength 0.5"):
        slots.blend({0: 0.5, 1: 1.0})
    assert_unchanged(model, before)
    slots.blend([{0: 1.0}, {1: 0.25}, {}, {0: 1.0, 1: 0.5}])  # DoRA at 1, plain at any strength: served
    with torch.no_grad():
        logits = model(tokens).logits
    torch.testing.assert_close(logits[0], references["dora-a"][0], atol=1e-5, rtol=0)
    assert torch.equal(logits[2], references["base"][2])
    slots.blend({1: 0.5})
    before = snapshot(model)
    with pytest.raises(DoraStrengthError, match="strength other than 1"):
        slots.load(sources["dora-b"], slot=1)  # the slot is read at 0.5: a DoRA adapter may not land there
    assert_unchanged(model, before)
    pool = loraswap.AdapterPool(slots)
    with pytest.raises(DoraStrengthError, match="DoRA"):
        with pool.route([{str(sources["dora-a"]): 0.7}]):
            pass


def test_failed_dora_loads_leave_the_model_bit_for_bit(llama_base, sources, tmp_path):
    model = copy.deepcopy(llama_base)
    capacity = dataclasses.replace(loraswap.Capacity.for_adapters(sources.values()), dora=False)
    slots = loraswap.attach(model, capacity)
    slots.load(sources["plain"])
    before = snapshot(model)
    with pytest.raises(CapacityError, match=r"DoRA.*Capacity\(\.\.\., dora=True\)"):
        slots.load(sources["dora-a"])
    assert_unchanged(model, before)

    model, slots = attached(llama_base, sources)
    slots.load(sources["dora-b"])
    adapter = loraswap.load_adapter(sources["dora-a"])
    name = next(iter(adapter.layers))
    broken = {
        "nan": (NonFiniteError, lambda m: m.index_fill(0, torch.tensor([1]), float("nan"))),
        "zero norm": (NonFiniteError, lambda m: m * float("inf")),
        "shape": (ShapeMismatchError, lambda m: m[:-1]),
    }
    before = snapshot(model)
    for label, (error, edit) in broken.items():
        layers = dict(adapter.layers)
        layers[name] = dataclasses.replace(layers[name], magnitude=edit(layers[name].magnitude))
        with pytest.raises(error):
            slots.load(dataclasses.replace(adapter, layers=layers, source=label))
        assert_unchanged(model, before)


def test_fused_dora_matches_peft_and_merge_and_unload_and_unloads_bit_for_bit(llama_base, sources, references, tokens):
    model = copy.deepcopy(llama_base)
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters(sources.values(), model=model), mode="fused")
    pristine = snapshot(model)
    with torch.no_grad():
        for name in ("dora-a", "plain", "dora-b"):
            slots.load(sources[name])
            logits = model(tokens).logits
            torch.testing.assert_close(logits, references[name], atol=1e-5, rtol=0)
            if name != "plain":
                merged = peft_reference(llama_base, sources[name]).merge_and_unload()
                torch.testing.assert_close(logits, merged(tokens).logits, atol=1e-6, rtol=0)
        slots.unload(0)
    assert_unchanged(model, pristine)


class ConvNet(torch.nn.Module):
    """A conv (bias, padding, stride), a grouped conv and a Linear: PEFT's DoRA conv path and its refusal."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.grouped = torch.nn.Conv2d(8, 8, 1, groups=2)
        self.head = torch.nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.grouped(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def conv_case(tmp_path_factory):
    torch.manual_seed(0)
    base = ConvNet().eval()
    directory = tmp_path_factory.mktemp("dora-conv")
    paths = {
        "conv": write_dora_adapter(base, directory / "conv", seed=1, r=4, lora_alpha=8, target_modules=["conv", "head"]),
        "grouped": write_dora_adapter(base, directory / "grouped", seed=2, r=2, lora_alpha=2, target_modules=["grouped"]),
    }
    return base, paths, torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1))


def test_conv2d_dora_matches_peft_in_slots_and_fused_mode_and_grouped_conv_is_refused(conv_case):
    base, paths, x = conv_case
    with torch.no_grad():
        reference = peft_reference(base, paths["conv"])(x)
        merged = peft_reference(base, paths["conv"]).merge_and_unload()(x)
        plain = base(x)
    assert not torch.allclose(reference, plain, atol=1e-3)
    model = copy.deepcopy(base)
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters([paths["conv"]], model=model, slots=2, max_batch=2))
    slots.load(paths["conv"], slot=1)
    slots.route([1, -1])
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out[0], reference[0], atol=1e-5, rtol=0)
    assert torch.equal(out[1], plain[1])
    fused_model = copy.deepcopy(base)
    capacity = loraswap.Capacity.for_adapters([paths["conv"]], model=fused_model)
    fused = loraswap.attach(fused_model, capacity, mode="fused")
    fused.load(paths["conv"])
    with torch.no_grad():
        torch.testing.assert_close(fused_model(x), reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(fused_model(x), merged, atol=1e-6, rtol=0)
    grouped_model = copy.deepcopy(base)
    capacity = loraswap.Capacity.for_adapters([paths["grouped"]], model=grouped_model)
    grouped = loraswap.attach(grouped_model, capacity)
    before = snapshot(grouped_model)
    with pytest.raises(loraswap.UnsupportedAdapterError, match="DoRA on a conv with groups=2"):
        grouped.load(paths["grouped"])
    assert_unchanged(grouped_model, before)


def test_peft_dropin_answers_dora_as_peft_does(llama_base, sources):
    """PEFT 0.21's hotswap_adapter does not swap DoRA (its key check meets lora_magnitude_vector); the drop-in
    keeps PEFT's exception and message, as its contract says (DoRA is served through loraswap.attach)."""
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    import loraswap.peft as dropin

    outcomes = []
    for hotswap in (peft_hotswap, dropin.hotswap_adapter):
        model = PeftModel.from_pretrained(copy.deepcopy(llama_base), str(sources["dora-a"])).eval()
        with pytest.raises(Exception) as raised:
            hotswap(model, str(sources["dora-a"]), adapter_name="default")
        outcomes.append((type(raised.value), str(raised.value)))
    assert outcomes[0] == outcomes[1]
