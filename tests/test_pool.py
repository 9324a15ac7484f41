"""AdapterPool: adapter ids over fewer slots, checked row by row against PEFT's eager models."""

from __future__ import annotations

import copy
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import loraswap
from loraswap import AdapterFolder, AdapterPool
from loraswap.testing.synthetic import merged_reference, peft_reference, write_catalogue

SLOTS = 3
ROWS = 6


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 96, (ROWS, 7), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def reference(peft_model, llama_base, tokens):
    """Row logits for ``{name: strength}`` (empty: the base model), from PEFT's merged deltas, memoised."""
    memo = {}

    def logits(weights: dict[str, float]) -> torch.Tensor:
        key = tuple(sorted(weights.items()))
        if key not in memo:
            with torch.no_grad():
                memo[key] = merged_reference(peft_model, llama_base, weights)(tokens).logits
        return memo[key]

    return logits


@pytest.fixture(scope="module")
def served(llama_base, llama_adapters):
    """A model attached with fewer slots than adapters, compiled once (eager backend: guards are what is tested)."""
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity.for_adapters(
        llama_adapters.values(), model=model, slots=SLOTS, max_batch=ROWS, max_blend=2
    )
    slots = loraswap.attach(model, capacity)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    return slots, compiled


@pytest.fixture
def pool(served, llama_adapters):
    slots, _ = served
    for slot in range(SLOTS):
        slots.unload(slot)
    return AdapterPool(slots, resolve=lambda name: llama_adapters[name])


def as_weights(row) -> dict[str, float]:
    if row is None:
        return {}
    return dict(row) if isinstance(row, dict) else {row: 1.0}


def check_rows(logits: torch.Tensor, rows: list, reference) -> None:
    for index, row in enumerate(rows):
        torch.testing.assert_close(
            logits[index], reference(as_weights(row))[index], atol=1e-4, rtol=0, msg=lambda m: f"row {index} {row}: {m}"
        )


def random_batch(rng: random.Random, names: list[str]) -> list:
    """Rows over at most SLOTS distinct adapters: ids, None, single strengths and two-adapter blends."""
    chosen = rng.sample(names, rng.randint(1, SLOTS))
    rows = []
    for _ in range(ROWS):
        kind = rng.choice(["id", "id", "none", "strength", "blend"])
        if kind == "id":
            rows.append(rng.choice(chosen))
        elif kind == "none":
            rows.append(None)
        elif kind == "strength":
            rows.append({rng.choice(chosen): rng.choice([0.5, 1.5, -0.7])})
        else:
            rows.append(dict.fromkeys(rng.sample(chosen, min(2, len(chosen))), 0.6))
    return rows


def forward(compiled, tokens) -> torch.Tensor:
    with torch.no_grad():
        return compiled(tokens).logits


def test_random_batches_over_more_adapters_than_slots_match_peft(pool, served, tokens, names, reference):
    _, compiled = served
    with pool.route([names[0]] * ROWS):
        forward(compiled, tokens)  # warm-up: the one compilation
    rng = random.Random(0)
    with loraswap.no_recompile():
        for _ in range(8):
            rows = random_batch(rng, names)
            with pool.route(rows):
                logits = forward(compiled, tokens)
            check_rows(logits, rows, reference)
    stats = pool.stats
    assert stats["evictions"] > 0, stats
    assert stats["slot_hits"] > 0, stats
    assert stats["slot_loads"] == stats["host_misses"] + stats["host_hits"], stats


def test_strengths_route_through_routing_weights(pool, served, tokens, names, reference):
    _, compiled = served
    rows = [{names[1]: 0.25}, names[1], {names[1]: 2.0}, None, {names[1]: 0.25}, names[1]]
    with pool.route(rows):
        logits = forward(compiled, tokens)
    check_rows(logits, rows, reference)
    assert list(pool.resident) == [names[1]]


def test_lru_evicts_the_least_recently_used(pool, names):
    for name in names[:SLOTS]:
        with pool.route([name]):
            pass
    with pool.route([names[0]]):  # names[1] is now the least recently used
        pass
    with pool.route([names[3]]):
        pass
    assert set(pool.resident) == {names[0], names[2], names[3]}
    assert pool.stats["evictions"] == 1


def slot_state(slots) -> list[torch.Tensor]:
    return [tensor.clone() for tensor in (*slots.storage.tensors, *slots.router.named_tables().values())]


def assert_unchanged(pool, before_resident, before_state) -> None:
    assert pool.resident == before_resident
    for old, new in zip(before_state, slot_state(pool.slots)):
        assert torch.equal(old, new)


def test_over_capacity_batch_raises_naming_both_numbers_and_changes_nothing(pool, names):
    with pool.route([names[0], names[1]]):
        pass
    resident, state = pool.resident, slot_state(pool.slots)
    with pytest.raises(loraswap.CapacityError, match=rf"{SLOTS + 1} distinct adapters.*{SLOTS} slots"):
        with pool.route([{name: 1.0} for name in names[: SLOTS + 1]]):
            pass
    assert_unchanged(pool, resident, state)


@pytest.mark.parametrize(
    "bad, error",
    [
        ("no-such-adapter", loraswap.AdapterNotFoundError),
        ({"attn-r2": float("nan")}, loraswap.SlotError),
        ({"attn-r2": 0.5, "mlp-r32-rslora": 0.5, "embed-and-v": 0.5}, loraswap.SlotError),  # over max_blend
    ],
)
def test_a_bad_row_raises_for_that_batch_only(pool, served, tokens, names, reference, bad, error):
    with pool.route([names[0], names[1], names[2]]):
        pass
    resident, state = pool.resident, slot_state(pool.slots)
    with pytest.raises(error):
        with pool.route([names[3], bad]):  # names[3] would evict: the bad row must stop it first
            pass
    assert_unchanged(pool, resident, state)
    rows = [names[3], None]
    with pool.route(rows):
        check_rows(forward(served[1], tokens), rows, reference)


def test_a_failed_resolve_is_a_not_found_error(served):
    pool = AdapterPool(served[0], resolve={}.__getitem__)
    with pytest.raises(loraswap.AdapterNotFoundError, match="'missing'"):
        with pool.route(["missing"]):
            pass


def test_a_pinned_slot_is_never_evicted(pool, served, tokens, names, reference):
    """Thread A holds its slot inside ``route``; thread B's batch needs every slot, so it waits for A."""
    _, compiled = served
    inside, release, b_done = threading.Event(), threading.Event(), threading.Event()
    results = {}

    def hold():
        with pool.route([names[0]] * ROWS):
            inside.set()
            release.wait(timeout=30)
            results["a"] = forward(compiled, tokens)  # after B loaded into the other slots

    def crowd():
        rows = [names[1], names[2], names[3], None, None, None]
        with pool.route(rows):
            results["b"] = forward(compiled, tokens)
            results["b_rows"] = rows
        b_done.set()

    with ThreadPoolExecutor(2) as executor:
        a = executor.submit(hold)
        inside.wait(timeout=30)
        b = executor.submit(crowd)
        assert not b_done.wait(timeout=1.0), "B routed while A pinned a slot it would need"
        assert pool.resident.get(names[0]) is not None
        release.set()
        a.result(timeout=60)
        b.result(timeout=60)
    check_rows(results["a"], [names[0]] * ROWS, reference)
    check_rows(results["b"], results["b_rows"], reference)


def test_loads_overlap_a_running_batch_without_touching_it(pool, served, tokens, names, reference):
    """B loads into the free slots while A is inside ``route``; B routes only after A exits."""
    _, compiled = served
    inside, release = threading.Event(), threading.Event()
    results = {}

    def hold():
        with pool.route([names[0]] * ROWS):
            inside.set()
            release.wait(timeout=30)
            results["a"] = forward(compiled, tokens)

    def other():
        with pool.route([names[1], names[2]] * (ROWS // 2)):
            results["b"] = forward(compiled, tokens)

    with ThreadPoolExecutor(2) as executor:
        a = executor.submit(hold)
        inside.wait(timeout=30)
        b = executor.submit(other)
        deadline = threading.Event()
        while pool.stats["slot_loads"] < 3 and not deadline.wait(0.05):
            pass
        assert "b" not in results
        release.set()
        a.result(timeout=60)
        b.result(timeout=60)
    check_rows(results["a"], [names[0]] * ROWS, reference)
    check_rows(results["b"], [names[1], names[2]] * (ROWS // 2), reference)


def test_concurrent_submitters_each_get_their_own_rows(pool, served, tokens, names, reference):
    _, compiled = served
    batches = [random_batch(random.Random(seed), names) for seed in range(12)]
    for rows in batches:  # references first, so that the threads only run the pool
        for row in rows:
            reference(as_weights(row))

    def submit(rows):
        with pool.route(rows):
            return forward(compiled, tokens)

    with loraswap.no_recompile(), ThreadPoolExecutor(4) as executor:
        outputs = list(executor.map(submit, batches))
    for rows, logits in zip(batches, outputs):
        check_rows(logits, rows, reference)
    assert all(pins == 0 for pins in pool._pins)


def test_prefetch_fills_the_host_cache(served, llama_adapters, names):
    slots, _ = served
    slots.cache.clear()
    pool = AdapterPool(slots, resolve=lambda name: llama_adapters[name])
    futures = pool.prefetch([names[0], names[1], "unknown"])
    futures[0].result(timeout=60)
    futures[1].result(timeout=60)
    with pytest.raises(loraswap.AdapterNotFoundError):
        futures[2].result(timeout=60)
    with pool.route([names[0], names[1]]):
        pass
    assert pool.stats["host_hits"] == 2


def test_adapter_folder_names_directories_and_files(tmp_path, llama_adapters, names):
    import shutil

    shutil.copytree(llama_adapters[names[0]], tmp_path / "style-a")
    shutil.copy(llama_adapters[names[1]] / "adapter_model.safetensors", tmp_path / "char-b.safetensors")
    (tmp_path / "notes.txt").write_text("not an adapter")
    folder = AdapterFolder(tmp_path)
    assert folder.ids() == ["char-b", "style-a"]
    assert folder("style-a") == tmp_path / "style-a"
    assert folder("char-b") == tmp_path / "char-b.safetensors"
    for bad in ("notes", "../style-a", "style-a/adapter_model"):
        with pytest.raises(loraswap.AdapterNotFoundError):
            folder(bad)


@pytest.fixture(scope="module")
def fused(llama_base, llama_adapters):
    model = copy.deepcopy(llama_base)
    capacity = loraswap.Capacity.for_adapters(llama_adapters.values(), model=model, slots=2)
    slots = loraswap.attach(model, capacity, mode="fused")
    return AdapterPool(slots, resolve=lambda name: llama_adapters[name]), model


def test_fused_pool_merges_one_adapter_per_batch(fused, tokens, names, reference):
    pool, model = fused
    for name in [names[0], names[1], None, names[2], names[0]]:
        with pool.route([name] * ROWS):
            check_rows(forward(model, tokens), [name] * ROWS, reference)
    assert pool.stats["evictions"] >= 1


@pytest.mark.parametrize("rows", [["attn-r2", None], ["attn-r2", "mixed-patterns"], [{"attn-r2": 0.5}]])
def test_fused_pool_refuses_mixed_rows_and_strengths(fused, rows):
    pool, _ = fused
    with pytest.raises(loraswap.ModeError):
        with pool.route(rows):
            pass


def test_catalogue_adapters_are_what_peft_reads(llama_base, llama_tokens, tmp_path):
    """The benchmark's catalogue writer produces adapters PEFT loads as it loads its own."""
    paths = write_catalogue(llama_base, tmp_path, 7)
    chosen = [paths["adapter-0003"], paths["adapter-0006"]]  # rank 32 on every projection; rank 8 on q/v
    model = copy.deepcopy(llama_base)
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters(chosen, model=model))
    for path in chosen:
        slots.load(path)
        with torch.no_grad():
            expected = peft_reference(llama_base, path)(llama_tokens).logits
            torch.testing.assert_close(model(llama_tokens).logits, expected, atol=1e-5, rtol=0)


def test_zipf_traffic_favours_the_head():
    from loraswap.bench.pool import zipf_ids

    ids = [f"a{i}" for i in range(200)]
    draws = zipf_ids(ids, 4000, 1.1, random.Random(0))
    counts = sorted((draws.count(adapter_id) for adapter_id in set(draws)), reverse=True)
    assert counts[0] > 0.1 * len(draws) and len(counts) > 100
