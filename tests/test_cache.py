"""The host adapter cache: LRU byte budget, keys that notice changed files, warm loads, prefetch."""

from __future__ import annotations

import copy
import os
import threading
import time

import pytest
import torch

import loraswap
from loraswap import Capacity, attach
from loraswap.cache import AdapterCache, cache_key
from loraswap.testing.synthetic import peft_reference, tiny_llama, write_peft_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANKS = {"a": 4, "b": 8, "c": 16}
ATOL = 1e-5


@pytest.fixture(scope="module")
def base():
    return tiny_llama(hidden=64, layers=2, vocab=128)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapters")
    return {
        name: write_peft_adapter(
            base, directory / name, seed=index + 1, r=rank, lora_alpha=2 * rank, target_modules=TARGETS
        )
        for index, (name, rank) in enumerate(RANKS.items())
    }


@pytest.fixture(scope="module")
def references(base, adapters, tokens):
    return {name: logits(peft_reference(base, path), tokens) for name, path in adapters.items()}


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def fresh(base, **attach_options):
    model = copy.deepcopy(base)
    return model, attach(model, Capacity(max_rank=16, target_modules=TARGETS, slots=2), **attach_options)


def assert_matches(model, tokens, reference):
    torch.testing.assert_close(logits(model, tokens), reference, atol=ATOL, rtol=0)


@pytest.fixture
def no_reading(monkeypatch):
    """After this fixture is requested, any attempt to read an adapter file fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a warm load read the adapter again")

    def arm():
        monkeypatch.setattr(loraswap.swap, "load_adapter", refuse)

    return arm


def test_warm_load_reads_nothing_and_matches_peft(base, adapters, references, tokens, no_reading):
    model, slots = fresh(base)
    slots.load(adapters["a"])
    slots.load(adapters["b"])
    no_reading()
    slots.load(adapters["a"])
    assert (slots.cache.misses, slots.cache.hits) == (2, 1)
    assert_matches(model, tokens, references["a"])


def test_lru_evicts_least_recently_used_within_the_byte_budget(base, adapters):
    _, probe = fresh(base)
    budget = 2 * probe.layout.slot_nbytes
    _, slots = fresh(base, cache_bytes=budget)
    for name in ("a", "b", "a", "c"):  # "a" is used again, so "b" is the least recently used when "c" arrives
        slots.load(adapters[name])
    assert len(slots.cache) == 2 and slots.cache.nbytes <= budget
    assert cache_key(adapters["a"]) in slots.cache and cache_key(adapters["c"]) in slots.cache
    assert cache_key(adapters["b"]) not in slots.cache
    misses = slots.cache.misses
    slots.load(adapters["b"])
    assert slots.cache.misses == misses + 1


def test_cache_bytes_zero_disables_the_cache(base, adapters, references, tokens):
    """Without a cache a load reads the file straight into the slot: nothing is looked up or kept."""
    model, slots = fresh(base, cache_bytes=0)
    slots.load(adapters["c"])
    slots.load(adapters["c"])
    assert len(slots.cache) == 0 and slots.cache.misses == 0 and slots.cache.hits == 0
    assert_matches(model, tokens, references["c"])
    slots.load(adapters["c"], slot=1)
    slots.load(adapters["b"], slot=1)  # rank 8 over rank 16: c's rows 8-15 must be zeroed
    slots.activate(1)
    assert_matches(model, tokens, references["b"])


def test_negative_cache_bytes_is_refused(base):
    with pytest.raises(loraswap.HotswapError, match="cache_bytes"):
        fresh(base, cache_bytes=-1)


def test_rewritten_adapter_is_read_again(base, tokens, tmp_path):
    path = tmp_path / "adapter"
    write_peft_adapter(base, path, seed=11, r=8, lora_alpha=16, target_modules=TARGETS)
    old_reference = logits(peft_reference(base, path), tokens)
    model, slots = fresh(base)
    slots.load(path)
    assert_matches(model, tokens, old_reference)

    write_peft_adapter(base, path, seed=12, r=8, lora_alpha=16, target_modules=TARGETS)  # same size, new weights
    new_reference = logits(peft_reference(base, path), tokens)
    assert not torch.allclose(new_reference, old_reference, atol=1e-3)
    slots.load(path)
    assert slots.cache.misses == 2
    assert_matches(model, tokens, new_reference)


def test_key_follows_the_file_not_the_spelling(adapters, tmp_path, monkeypatch):
    path = adapters["a"]
    key = cache_key(path)
    link = tmp_path / "link"
    link.symlink_to(path, target_is_directory=True)
    monkeypatch.chdir(path.parent)
    assert cache_key(str(path)) == cache_key(f"{path}/") == cache_key(path.name) == cache_key(link) == key
    assert cache_key(path / "adapter_model.safetensors") != key

    weights = path / "adapter_model.safetensors"
    status = os.stat(weights)
    os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    assert cache_key(path) != key


def test_in_memory_adapter_is_keyed_by_identity(base, adapters, references, tokens):
    model, slots = fresh(base)
    adapter = loraswap.load_adapter(adapters["b"])
    slots.load(adapter)
    slots.load(adapter, slot=1)
    assert (slots.cache.misses, slots.cache.hits) == (1, 1)
    assert_matches(model, tokens, references["b"])


def test_prefetch_makes_the_next_load_warm(base, adapters, references, tokens, no_reading):
    model, slots = fresh(base)
    packed = slots.prefetch(adapters["c"]).result(timeout=60)
    assert packed.source == str(adapters["c"] / "adapter_model.safetensors")
    no_reading()
    slots.load(adapters["c"])
    assert (slots.cache.misses, slots.cache.hits) == (1, 1)
    assert_matches(model, tokens, references["c"])


def test_load_during_prefetch_waits_instead_of_reading_twice(base, adapters, references, tokens, monkeypatch):
    reads = []
    read = loraswap.swap.load_adapter

    def slow_read(*args, **kwargs):
        reads.append(threading.current_thread().name)
        time.sleep(0.2)  # keep the prefetch busy while the load arrives
        return read(*args, **kwargs)

    monkeypatch.setattr(loraswap.swap, "load_adapter", slow_read)
    model, slots = fresh(base)
    future = slots.prefetch(adapters["b"])
    slots.load(adapters["b"])
    future.result(timeout=60)
    assert len(reads) == 1
    assert_matches(model, tokens, references["b"])


def test_failed_prefetch_raises_from_the_future_and_touches_nothing(base, adapters, tokens, tmp_path):
    too_large = write_peft_adapter(base, tmp_path / "r32", seed=5, r=32, lora_alpha=32, target_modules=TARGETS)
    model, slots = fresh(base)
    slots.load(adapters["a"])
    before = logits(model, tokens)
    with pytest.raises(loraswap.CapacityError, match="rank 32"):
        slots.prefetch(too_large).result(timeout=60)
    assert cache_key(too_large) not in slots.cache
    assert torch.equal(logits(model, tokens), before)


class _Entry:
    nbytes = 1


def test_waiter_builds_itself_when_the_build_it_waited_for_fails():
    cache = AdapterCache(max_bytes=10)
    started, release = threading.Event(), threading.Event()
    errors = []

    def failing_build():
        started.set()
        release.wait(10)
        raise loraswap.PickleRefusedError("refused")

    def owner():
        try:
            cache.get_or_build("key", failing_build)
        except loraswap.HotswapError as err:
            errors.append(err)

    thread = threading.Thread(target=owner)
    thread.start()
    started.wait(10)
    timer = threading.Timer(0.1, release.set)
    timer.start()
    entry = cache.get_or_build("key", _Entry)
    thread.join(10)
    assert isinstance(entry, _Entry) and len(errors) == 1 and "key" in cache


def test_a_direct_load_clears_the_layers_the_previous_adapter_targeted(llama_base, llama_adapters, llama_tokens):
    """Without a cache a load zeroes only what the new adapter does not write: its rank padding and the
    layers it does not target (here every MLP layer and the embedding the previous adapters wrote)."""
    model = copy.deepcopy(llama_base)
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters(llama_adapters.values(), model=model), cache_bytes=0)
    for name in ("mlp-r32-rslora", "embed-and-v", "attn-r2"):
        slots.load(llama_adapters[name])
    with torch.no_grad():
        expected = peft_reference(llama_base, llama_adapters["attn-r2"])(llama_tokens).logits
        torch.testing.assert_close(model(llama_tokens).logits, expected, atol=1e-5, rtol=0)
