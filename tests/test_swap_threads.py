"""Swapping in one thread while another runs forwards: no forward ever mixes two adapters.

The serving thread holds ``slots.lock`` around each forward; the swapping thread loads the next
adapter into the slot no row reads (without the lock, concurrently with forwards) and then
activates it (which takes the lock, so it lands between two forwards). Every output must be
bit-for-bit the output of exactly one adapter, and that adapter's output matches PEFT.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from loraswap import Capacity, attach
from loraswap.testing.synthetic import peft_reference, tiny_llama, write_adapters

ADAPTERS = {
    "attention-r4": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "mlp-r16": {"r": 16, "lora_alpha": 16, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "all-r8": {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]},
}
SWAPS = 24


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The base model, a batch and the adapters every test here serves."""
    base = tiny_llama(hidden=64, layers=2, vocab=128)
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    return base, tokens, write_adapters(base, tmp_path_factory.mktemp("adapters"), ADAPTERS)


@pytest.fixture(scope="module")
def setup(parts):
    base, tokens, paths = parts
    model = copy.deepcopy(base)
    slots = attach(model, Capacity.for_adapters(paths.values(), model=model, slots=2))
    with torch.no_grad():
        peft = {name: peft_reference(base, path)(tokens).logits for name, path in paths.items()}
        own = {}
        for slot, (name, path) in itertools.product((1, 0), paths.items()):
            slots.load(path, slot=slot)
            slots.activate(slot)
            own[name, slot] = model(tokens).logits
    return model, slots, tokens, paths, peft, own


def adapters_matching(output, own):
    """The adapters whose own output (in either slot) equals ``output`` bit for bit."""
    return {name for (name, _), reference in own.items() if torch.equal(output, reference)}


def test_references_tell_the_adapters_apart(setup):
    _, _, _, _, peft, own = setup
    for (name, _), reference in own.items():
        torch.testing.assert_close(reference, peft[name], atol=1e-5, rtol=0)
        assert adapters_matching(reference, own) == {name}


def test_forwards_never_mix_adapters_while_another_thread_swaps(setup):
    model, slots, tokens, paths, peft, own = setup
    outputs: list[torch.Tensor] = []
    done = threading.Event()

    def serve():
        with torch.no_grad():
            while not done.is_set():
                with slots.lock:
                    outputs.append(model(tokens).logits)

    def swap():
        try:
            active = 0
            for name in itertools.islice(itertools.cycle(paths), SWAPS):
                idle = 1 - active
                slots.load(paths[name], slot=idle)  # no row reads it: runs concurrently with forwards
                slots.activate(idle)  # takes slots.lock: lands between two forwards
                active = idle
                time.sleep(0.003)  # let a few forwards run on each adapter
        finally:
            done.set()

    with ThreadPoolExecutor(max_workers=2) as pool:
        server, swapper = pool.submit(serve), pool.submit(swap)
        swapper.result(timeout=120)  # re-raises the thread's exception, if any
        server.result(timeout=120)
    assert outputs
    seen = set()
    for index, output in enumerate(outputs):
        names = adapters_matching(output, own)
        assert len(names) == 1, f"forward {index} matches {sorted(names) or 'no adapter'}: it mixed old and new weights"
        (name,) = names
        torch.testing.assert_close(output, peft[name], atol=1e-5, rtol=0)
        seen.add(name)
    assert len(seen) >= 2, "the forwards never overlapped a swap; the test proved nothing"


def test_loads_without_a_cache_in_two_threads_each_write_their_own_adapter(setup, parts):
    """A load without a host cache reads the file into a buffer it reuses, one per thread: two threads loading
    different adapters at once never write each other's bytes."""
    _, _, _, _, _, own = setup
    base, tokens, paths = parts
    model = copy.deepcopy(base)
    direct = attach(model, Capacity.for_adapters(paths.values(), model=model, slots=2), cache_bytes=0)
    names = list(paths)

    def load_in_turn(slot: int, order: list[str]) -> None:
        for name in order * 8:
            direct.load(paths[name], slot=slot)

    with ThreadPoolExecutor(max_workers=2) as pool:
        loaders = [pool.submit(load_in_turn, 0, names), pool.submit(load_in_turn, 1, names[::-1])]
        for loader in loaders:
            loader.result(timeout=60)
    with torch.no_grad():
        for slot, name in ((0, names[-1]), (1, names[0])):
            direct.activate(slot)
            assert torch.equal(model(tokens).logits, own[name, slot])


def test_an_activate_halfway_through_a_forward_is_detected(setup):
    """The check above can fail: switching slots between two decoder layers gives an output that is no adapter's."""
    model, slots, tokens, paths, _, own = setup
    names = list(paths)
    slots.load(paths[names[0]], slot=0)
    slots.load(paths[names[2]], slot=1)
    slots.activate(0)
    handle = model.model.layers[1].register_forward_pre_hook(lambda module, args: slots.activate(1))
    try:
        with torch.no_grad():
            mixed = model(tokens).logits
    finally:
        handle.remove()
    assert adapters_matching(mixed, own) == set()


SOAK_CYCLES = 8
FORWARD_THREADS = 2


def soak_script(paths: dict) -> list:
    """The swapping thread's steps: each cycle loads the next adapter into a slot no row reads (no lock),
    activates it, routes rows across it and the previous slot, blends the two, then unloads the third slot."""
    steps = []
    names = list(paths)
    for cycle in range(SOAK_CYCLES):
        new, previous, spare = (cycle + 1) % 3, cycle % 3, (cycle + 2) % 3
        path = paths[names[cycle % len(names)]]
        steps += [
            lambda slots, new=new, path=path: slots.load(path, slot=new),
            lambda slots, new=new: slots.activate(new),
            lambda slots, new=new, previous=previous: slots.route([new, previous]),
            lambda slots, new=new, previous=previous: slots.blend({new: 0.75, previous: 0.25}),
            lambda slots, spare=spare: slots.unload(spare),
        ]
    return steps


def reset(slots) -> None:
    for slot in range(3):
        slots.unload(slot)
    slots.activate(0)


def test_soak_forward_threads_against_a_thread_that_loads_activates_routes_blends_and_unloads(parts):
    base, tokens, paths = parts
    model = copy.deepcopy(base)
    slots = attach(model, Capacity.for_adapters(paths.values(), model=model, slots=3, max_blend=2))
    script = soak_script(paths)
    references: list[torch.Tensor] = []  # the distinct outputs of every state the script passes through
    reset(slots)
    with torch.no_grad():
        for step in [lambda slots: None, *script]:
            step(slots)
            output = model(tokens).logits
            if not any(torch.equal(output, seen) for seen in references):
                references.append(output)
    assert len(references) >= 3 * len(paths), "the states must be told apart for the check to mean anything"

    reset(slots)
    outputs: list[list[torch.Tensor]] = [[] for _ in range(FORWARD_THREADS)]
    done = threading.Event()

    def serve(thread: int) -> None:
        with torch.no_grad():
            while not done.is_set():
                with slots.lock:  # the documented discipline: a forward never sees a verb halfway
                    outputs[thread].append(model(tokens).logits)

    def swap() -> None:
        try:
            for step in script:
                step(slots)
                time.sleep(0.002)
        finally:
            done.set()

    with ThreadPoolExecutor(max_workers=FORWARD_THREADS + 1) as pool:
        servers = [pool.submit(serve, thread) for thread in range(FORWARD_THREADS)]
        pool.submit(swap).result(timeout=60)
        for server in servers:
            server.result(timeout=60)
    hits = [0] * len(references)
    for thread, thread_outputs in enumerate(outputs):
        for index, output in enumerate(thread_outputs):
            matches = [ref for ref, reference in enumerate(references) if torch.equal(output, reference)]
            assert len(matches) == 1, f"thread {thread} forward {index} matches {len(matches)} states: a half-done verb"
            hits[matches[0]] += 1
    print(
        f"soak: {len(script)} verbs, {[len(o) for o in outputs]} forwards per thread, "
        f"{sum(h > 0 for h in hits)}/{len(references)} states observed, forwards per state {hits}"
    )
    assert all(outputs) and sum(h > 0 for h in hits) >= 3, "the forwards never overlapped the verbs"
