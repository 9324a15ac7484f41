"""Heterogeneous batches: per-row routing, per-token routing and blends, checked against PEFT's eager models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import loraswap
from loraswap.testing.synthetic import merged_reference, peft_multi_adapter, write_adapters

from conftest import holds_rows_past_live

MAX_BATCH = 8


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 96, (MAX_BATCH, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def references(peft_model, llama_base, names, tokens):
    """PEFT's eager single-adapter logits for every adapter, and the base model's."""
    outputs = {}
    with torch.no_grad():
        for name in names:
            peft_model.set_adapter(name)
            outputs[name] = peft_model(tokens).logits
        outputs["base"] = llama_base(tokens).logits
    return outputs


@pytest.fixture(scope="module")
def attached(llama_base, llama_adapters):
    """Four adapters in the dense capacity (``max_blend=slots``): any blend, per-token routing."""
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity.for_adapters(
        llama_adapters.values(), model=model, slots=len(llama_adapters), max_batch=MAX_BATCH, max_blend=4
    )
    slots = loraswap.attach(model, capacity)
    for slot, path in enumerate(llama_adapters.values()):
        slots.load(path, slot=slot)
    return model, slots


@pytest.fixture(scope="module")
def compiled(attached, tokens):
    """The attached model compiled once, with a dynamic batch dimension."""
    model, slots = attached
    torch._dynamo.reset()
    compiled = torch.compile(model)
    first = tokens.clone()
    torch._dynamo.mark_dynamic(first, 0)
    slots.activate(0)
    with torch.no_grad():
        compiled(first)
    return compiled


def expected_rows(references: dict, names: list[str], ids: list[int], rows: int | None = None) -> torch.Tensor:
    rows = len(ids) if rows is None else rows
    return torch.stack([references["base" if slot == -1 else names[slot]][row] for row, slot in enumerate(ids[:rows])])


def test_routed_rows_match_peft_single_adapter_eager(attached, references, names, tokens):
    model, slots = attached
    ids = [0, 1, -1, 2, 3, 1, -1, 0]
    slots.route(ids)
    with torch.no_grad():
        logits = model(tokens).logits
    for row, slot in enumerate(ids):
        if slot == -1:
            assert torch.equal(logits[row], references["base"][row]), f"row {row} routed to -1 is not the base model"
        else:
            torch.testing.assert_close(logits[row], references[names[slot]][row], atol=1e-5, rtol=0)


def test_routed_rows_match_peft_adapter_names_batch(attached, peft_model, names, tokens):
    model, slots = attached
    ids = [3, 3, 0, -1, 1, 2, 0, 2]
    slots.route(ids)
    with torch.no_grad():
        expected = peft_model(tokens, adapter_names=["__base__" if s == -1 else names[s] for s in ids]).logits
        torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=0)


def test_new_mixes_blends_and_batch_sizes_never_recompile(compiled, attached, references, peft_model, llama_base, names, tokens):
    _, slots = attached
    mixes = [[0, 1, 2, 3, -1, 0, 1, 2], [-1] * 8, [3, 2, 1, 0, 3, 2, 1, 0], [2, -1, 2, -1, 1, 1, 0, 3]]
    blend = {0: 0.7, 3: 0.3}
    blended = merged_reference(peft_model, llama_base, {names[s]: w for s, w in blend.items()})
    with torch.no_grad():
        blended_logits = blended(tokens).logits
    with torch._dynamo.config.patch(error_on_recompile=True), loraswap.no_recompile(), torch.no_grad():
        for ids in mixes:
            slots.route(ids)
            torch.testing.assert_close(compiled(tokens).logits, expected_rows(references, names, ids), atol=1e-4, rtol=0)
        for batch in range(2, MAX_BATCH + 1):
            ids = mixes[0][-batch:]
            slots.route(ids)
            torch.testing.assert_close(
                compiled(tokens[-batch:]).logits, expected_rows(references, names, mixes[0])[-batch:], atol=1e-4, rtol=0
            )
        slots.activate(2)
        torch.testing.assert_close(compiled(tokens).logits, references[names[2]], atol=1e-4, rtol=0)
        slots.blend(blend)
        torch.testing.assert_close(compiled(tokens).logits, blended_logits, atol=1e-4, rtol=0)
        slots.route([1, 0], per_token=True)
        compiled(tokens)
        slots.activate(0)
        torch.testing.assert_close(compiled(tokens).logits, references[names[0]], atol=1e-4, rtol=0)


def test_blend_equals_weighted_sum_of_deltas(attached, peft_model, llama_base, names, tokens):
    model, slots = attached
    blend = {0: 0.7, 1: 0.3, 2: -0.5, 3: 1.25}
    slots.blend(blend)
    reference = merged_reference(peft_model, llama_base, {names[s]: w for s, w in blend.items()})
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, atol=1e-5, rtol=0)


def test_blend_equals_peft_add_weighted_adapter(llama_base, llama_adapters, tokens):
    """PEFT's ``cat`` combination is exactly the weighted sum of deltas (plain LoRA adapters)."""
    chosen = {"attn-r2": 0.6, "embed-and-v": 0.4}
    peft_model = peft_multi_adapter(llama_base, {name: llama_adapters[name] for name in chosen})
    peft_model.add_weighted_adapter(list(chosen), list(chosen.values()), "blend", combination_type="cat")
    peft_model.set_adapter("blend")
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity.for_adapters(llama_adapters.values(), model=model, slots=3, max_blend=2)
    slots = loraswap.attach(model, capacity)  # gathered: two terms per row out of three slots
    for slot, name in enumerate(chosen):
        slots.load(llama_adapters[name], slot=slot)
    slots.blend(dict(enumerate(chosen.values())))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, peft_model(tokens).logits, atol=1e-5, rtol=0)


def test_per_row_blends(attached, peft_model, llama_base, names, tokens):
    model, slots = attached
    rows = [{0: 1.0}, {1: 0.5, 2: 0.5}, {}, {3: 2.0, 0: -1.0}]
    slots.blend(rows)
    with torch.no_grad():
        logits = model(tokens).logits
        for row, weights in enumerate(rows):
            reference = merged_reference(peft_model, llama_base, {names[s]: w for s, w in weights.items()})
            torch.testing.assert_close(logits[row], reference(tokens[row : row + 1]).logits[0], atol=1e-5, rtol=0)
        rest = llama_base(tokens[len(rows) :]).logits
    assert torch.equal(logits[len(rows) :], rest), "rows past a per-row blend must be the base model"


def test_rows_past_max_batch(attached, references, names, llama_base, tokens):
    """``activate`` covers any batch size; ``route`` leaves rows it does not name on the base model."""
    model, slots = attached
    big = torch.cat([tokens, tokens[:3]])
    slots.activate(1)
    with torch.no_grad():
        torch.testing.assert_close(model(big).logits[MAX_BATCH:], references[names[1]][:3], atol=1e-5, rtol=0)
        slots.route([2] * MAX_BATCH)
        logits = model(big).logits
    torch.testing.assert_close(logits[:MAX_BATCH], references[names[2]], atol=1e-5, rtol=0)
    assert torch.equal(logits[MAX_BATCH:], references["base"][:3])


def test_bad_routes_raise_and_change_nothing(attached):
    model, slots = attached
    slots.route([1, 0, -1])
    before = slots.router.row_weights.clone(), slots.router.per_token.clone()
    with pytest.raises(loraswap.SlotError, match="max_batch"):
        slots.route([0] * (MAX_BATCH + 1))
    with pytest.raises(loraswap.SlotError, match="outside the 4 slot"):
        slots.route([0, 4])
    with pytest.raises(loraswap.SlotError, match="outside the 4 slot"):
        slots.route([0, -2])
    with pytest.raises(loraswap.SlotError, match="finite"):
        slots.blend({0: float("nan")})
    with pytest.raises(loraswap.SlotError, match="outside"):
        slots.blend([{0: 1.0}, {7: 1.0}])
    with pytest.raises(loraswap.SlotError, match="max_batch"):
        slots.blend([{0: 1.0}] * (MAX_BATCH + 1))
    assert torch.equal(slots.router.row_weights, before[0]) and torch.equal(slots.router.per_token, before[1])


class TokenMLP(nn.Module):
    """Tokens in, one vector per token out: no mixing across tokens, so packed requests stay independent."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(ids))))


@pytest.fixture(scope="module")
def packed_setup(tmp_path_factory):
    base = TokenMLP().eval()
    paths = write_adapters(
        base,
        tmp_path_factory.mktemp("mlp-adapters"),
        {
            "up-r4": dict(r=4, lora_alpha=8, target_modules=["up"]),
            "all-r8": dict(r=8, lora_alpha=4, target_modules=["embed", "up", "down"]),
            "down-r2": dict(r=2, lora_alpha=2, target_modules=["down"]),
        },
    )
    peft_model = peft_multi_adapter(base, paths)
    model = copy.deepcopy(base)
    capacity = loraswap.Capacity.for_adapters(paths.values(), model=model, slots=3, max_batch=32, max_blend=3)
    slots = loraswap.attach(model, capacity)
    for slot, path in enumerate(paths.values()):
        slots.load(path, slot=slot)
    return base, peft_model, list(paths), model, slots


@pytest.mark.parametrize("shape", [(1, 20), (20,)], ids=["packed-row", "flat"])
def test_per_token_routing_matches_peft(packed_setup, shape):
    base, peft_model, names, model, slots = packed_setup
    ids = torch.randint(0, 40, shape, generator=torch.Generator().manual_seed(5))
    routes = [(-1, 0, 1, 2, 2)[i % 5] for i in range(20)]
    slots.route(routes, per_token=True)
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        eager_out = model(ids).reshape(20, -1)
        compiled_out = compiled(ids).reshape(20, -1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            slots.route(routes[::-1], per_token=True)
            compiled(ids)
            slots.route(routes, per_token=True)
            assert torch.equal(compiled(ids).reshape(20, -1), compiled_out)
        for slot in range(-1, 3):
            if slot == -1:
                expected = base(ids).reshape(20, -1)
            else:
                peft_model.set_adapter(names[slot])
                expected = peft_model(ids).reshape(20, -1)
            for token, routed in enumerate(routes):
                if routed != slot:
                    continue
                if slot == -1:
                    assert torch.equal(eager_out[token], expected[token])
                else:
                    torch.testing.assert_close(eager_out[token], expected[token], atol=1e-5, rtol=0)
                torch.testing.assert_close(compiled_out[token], expected[token], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def gathered(llama_base, llama_adapters):
    """The same four adapters in the default capacity (``max_blend=1``): every layer gathers each row's slot.

    Each slot held every other adapter first, so rank rows past the live ones hold stale values the gather
    must never read."""
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity.for_adapters(llama_adapters.values(), model=model, slots=4, max_batch=MAX_BATCH)
    assert capacity.max_blend == 1
    slots = loraswap.attach(model, capacity)
    paths = list(llama_adapters.values())
    for slot, path in enumerate(paths):
        for earlier in paths[slot + 1 :] + paths[:slot]:
            slots.load(earlier, slot=slot)
        slots.load(path, slot=slot)
    assert any(holds_rows_past_live(slots, slot) for slot in range(len(paths)))
    return model, slots


def test_gathered_rows_match_peft_compiled_without_recompiles(gathered, references, names, tokens):
    model, slots = gathered
    compiled = torch.compile(model, dynamic=True)
    mixes = [[0, 1, 2, 3, -1, 3, 2, 1], [3, 3, -1, 0, 1, 1, 2, 0], [-1] * MAX_BATCH]
    with torch.no_grad():
        slots.route(mixes[0])
        compiled(tokens)
        with torch._dynamo.config.patch(error_on_recompile=True), loraswap.no_recompile():
            for mix in mixes:
                slots.route(mix)
                for logits, eager, slot, row in zip(compiled(tokens).logits, model(tokens).logits, mix, range(len(mix))):
                    expected = references["base"][row] if slot == -1 else references[names[slot]][row]
                    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
                    torch.testing.assert_close(eager, expected, atol=1e-5, rtol=0)
                    if slot == -1:
                        assert torch.equal(eager, expected), "a -1 row must be exactly the base model"
            slots.activate(2)
            torch.testing.assert_close(compiled(tokens).logits, references[names[2]], atol=1e-4, rtol=0)


def test_gathered_capacity_refuses_wider_blends_and_per_token_routing(gathered):
    _, slots = gathered
    slots.route([0, 1])
    before = {name: table.clone() for name, table in slots.router.named_tables().items()}
    with pytest.raises(loraswap.SlotError, match=r"mixes 2 slots but Capacity\.max_blend is 1"):
        slots.blend({0: 0.5, 1: 0.5})
    with pytest.raises(loraswap.SlotError, match=r"Capacity\(max_blend=4\)"):
        slots.route([0, 1], per_token=True)
    after = slots.router.named_tables()
    assert after.keys() == before.keys() == {"per_token", "row_slots", "row_terms"}
    assert all(torch.equal(after[name], before[name]) for name in after)
    slots.blend({2: 0.25})
    assert torch.equal(slots.router.row_slots[:, 0], torch.full((MAX_BATCH + 1,), 2))


def test_gathered_bf16_rows_match_peft_bf16(llama_base, llama_adapters, names, tokens):
    """bf16 model, default capacity: each routed row against PEFT's bf16 ``adapter_names=`` batch.

    Tolerance: the two differ only in bf16 rounding order, so loraswap must be as close to PEFT's bf16
    output as PEFT's bf16 output is to its own fp32 output (and within 0.05 absolute on these logits).
    """
    base = copy.deepcopy(llama_base).to(torch.bfloat16)
    peft_model = peft_multi_adapter(base, llama_adapters)
    model = copy.deepcopy(base)
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters(llama_adapters.values(), model=model, slots=4))
    for slot, path in enumerate(llama_adapters.values()):
        slots.load(path, slot=slot)
    ids = [3, 0, -1, 1, 2, 2, 0, 3]
    slots.route(ids)
    adapter_names = ["__base__" if s == -1 else names[s] for s in ids]
    with torch.no_grad():
        expected = peft_model(tokens, adapter_names=adapter_names).logits.float()
        fp32 = peft_multi_adapter(llama_base, llama_adapters)(tokens, adapter_names=adapter_names).logits
        logits = model(tokens).logits.float()
    bf16_error = (expected - fp32).abs().max().item()
    torch.testing.assert_close(logits, expected, atol=min(max(bf16_error, 1e-2), 0.05), rtol=0)
