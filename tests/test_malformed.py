"""Property tests: every malformed safetensors file or adapter config ends in a HotswapError, from a load and from
``inspect``, quickly and without a large allocation; nothing crashes, hangs or changes the model."""

from __future__ import annotations

import copy
import json
import resource
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import loraswap
from conftest import assert_unchanged, snapshot

BOUNDED = settings(
    max_examples=40,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NOT_FLOAT_DTYPES = ["I8", "U8", "BOOL", "I64", "I32"]
HUGE = st.integers(1 << 31, (1 << 64) - 1)  # the largest a safetensors header's u64 length can hold


@pytest.fixture(scope="module")
def served(llama_base, llama_adapters):
    model = copy.deepcopy(llama_base)
    slots = loraswap.attach(model, loraswap.Capacity(max_rank=4, target_modules=["q_proj", "v_proj"]))
    slots.load(llama_adapters["attn-r2"])
    return model, slots


@pytest.fixture(scope="module")
def valid(llama_adapters):
    """The bytes of a valid PEFT adapter file, its parsed header, and its config."""
    directory = llama_adapters["attn-r2"]
    raw = (directory / "adapter_model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw, json.loads(raw[8 : 8 + length]), json.loads((directory / "adapter_config.json").read_text())


def with_header(raw: bytes, header) -> bytes:
    """``raw``'s tensor data behind a new header (any JSON value, or bytes as they are)."""
    (length,) = struct.unpack("<Q", raw[:8])
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :]


def entry_damage(header: dict):
    """Strategies that damage one tensor entry of ``header``: offsets, shape or dtype."""
    keys = sorted(k for k in header if k != "__metadata__")
    first_size = header[keys[0]]["data_offsets"][1]

    def damaged(key, field, value):
        if header[key].get(field) == value:
            value = [value, 1] if field != "dtype" else value + "X"
        return {**header, key: {**header[key], field: value}}

    key = st.sampled_from(keys)
    offsets = st.one_of(
        st.tuples(HUGE, HUGE),  # out of range
        st.tuples(st.integers(0, first_size - 1), st.integers(first_size, 2 * first_size)),  # overlapping
        st.tuples(st.integers(-5, -1), st.integers(0, 10)),
    ).map(list)
    shapes = st.one_of(
        st.lists(HUGE, min_size=1, max_size=3), st.lists(st.integers(-3, 3), max_size=4), st.just("2x64")
    )
    dtypes = st.one_of(st.sampled_from(NOT_FLOAT_DTYPES + ["F7", "", "float32"]), st.integers(), st.none())
    return st.one_of(
        st.builds(damaged, key, st.just("data_offsets"), offsets),
        st.builds(damaged, key, st.just("shape"), shapes),
        st.builds(damaged, key, st.just("dtype"), dtypes),
        st.builds(lambda k: {**header, k: [1, 2, 3]}, key),
        st.builds(lambda k: {kk: v for kk, v in header.items() if kk != k}, key),  # a tensor dropped: a gap
    )


def damaged_files(valid):
    raw, header, _ = valid
    deep = st.integers(100, 100_000).map(lambda depth: ("[" * depth + "]" * depth).encode())
    return st.one_of(
        st.integers(0, len(raw) - 1).map(lambda n: raw[:n]),  # truncated anywhere
        st.binary(min_size=1, max_size=64).map(lambda junk: raw + junk),  # trailing bytes
        entry_damage(header).map(lambda h: with_header(raw, h)),
        st.binary(min_size=1, max_size=200).map(lambda b: with_header(raw, b"\xff\xfe" + b)),  # not UTF-8
        deep.map(lambda nested: with_header(raw, nested)),  # deeply nested
        st.sampled_from([[], 3, "header", None]).map(lambda h: with_header(raw, h)),  # not an object
        st.sampled_from([[1], {"a": 1}, "x"]).map(lambda m: with_header(raw, {**header, "__metadata__": m})),
        HUGE.map(lambda n: struct.pack("<Q", n) + raw[8:]),  # absurd header length
    )


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def assert_refused_by_load_and_inspect(slots, path: Path) -> None:
    """The load raises; ``inspect`` raises too, or describes the file with the reason the load refused it."""
    with pytest.raises(loraswap.HotswapError):
        slots.load(path, slot=0)
    try:
        info = loraswap.inspect(path)
    except loraswap.HotswapError:
        return
    assert info.unsupported


def test_malformed_safetensors_files_are_refused(served, valid):
    model, slots = served
    before = snapshot(model)
    rss_before = max_rss_bytes()

    @BOUNDED
    @given(data=damaged_files(valid))
    def check(data):
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "adapter.safetensors"
            path.write_bytes(data)
            assert_refused_by_load_and_inspect(slots, path)

    check()
    assert_unchanged(model, before)
    assert max_rss_bytes() - rss_before < 256 << 20  # no tensor of a declared absurd size was ever allocated


def test_lora_weights_of_a_non_float_dtype_are_refused(served, llama_adapters, tmp_path):
    model, slots = served
    before = snapshot(model)
    tensors = load_file(llama_adapters["attn-r2"] / "adapter_model.safetensors")
    for dtype in (torch.int8, torch.bool, torch.int64):
        path = tmp_path / f"{dtype}.safetensors"
        save_file({key: value.to(dtype) for key, value in tensors.items()}, path)
        with pytest.raises(loraswap.HotswapError, match="floating point"):
            slots.load(path)
        assert any("not floating point" in reason for reason in loraswap.inspect(path).unsupported)
    assert_unchanged(model, before)


NOT_A_STRING = st.one_of(st.none(), st.booleans(), st.integers(), st.lists(st.integers(), min_size=1, max_size=2))
NOT_A_NUMBER = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.sampled_from([float("nan"), float("inf")]))
NOT_A_PATTERN = st.dictionaries(st.just("q_proj"), NOT_A_NUMBER, min_size=1)
BAD_FIELDS = {  # config field -> values that field can never take in a PEFT LoRA config
    "r": st.one_of(NOT_A_NUMBER, st.integers(-(1 << 70), 0), st.floats(0.1, 64.0)),
    "lora_alpha": st.one_of(NOT_A_NUMBER, st.lists(st.integers(), max_size=2)),
    "rank_pattern": st.one_of(NOT_A_STRING.filter(lambda v: v is not None), NOT_A_PATTERN),
    "alpha_pattern": st.one_of(st.text(min_size=1, max_size=4), NOT_A_PATTERN),
    "target_modules": st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), min_size=1, max_size=2)),
    "use_rslora": st.one_of(st.integers(), st.text(max_size=4)),
    "peft_type": st.one_of(
        NOT_A_STRING.filter(lambda v: v is not None), st.text(max_size=6).filter(lambda t: t.upper() != "LORA")
    ),
}  # fmt: skip


def damaged_configs(config: dict):
    """Configs that a PEFT adapter with rank-2 tensors cannot honestly have: a field of the wrong type or range,
    or fields that contradict the tensors, or no JSON object at all."""
    wrong_field = st.sampled_from(sorted(BAD_FIELDS)).flatmap(
        lambda field: BAD_FIELDS[field].map(lambda value: {**config, field: value})
    )
    contradictory = st.one_of(
        st.integers(3, 64).map(lambda r: {**config, "r": r}),  # the tensors have rank 2
        st.just({k: v for k, v in config.items() if k != "r"}),  # missing r: PEFT's default 8 contradicts rank 2
        st.integers(3, 9).map(lambda r: {**config, "rank_pattern": {"q_proj": r}}),
    )
    return st.one_of(wrong_field, contradictory, st.sampled_from([[], 2, "LORA"]))


def test_malformed_configs_are_refused(served, valid, llama_adapters):
    model, slots = served
    before = snapshot(model)
    _, _, config = valid

    @BOUNDED
    @given(damaged=damaged_configs(config))
    def check(damaged):
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "adapter"
            path.mkdir()
            (path / "adapter_model.safetensors").write_bytes(
                (llama_adapters["attn-r2"] / "adapter_model.safetensors").read_bytes()
            )
            (path / "adapter_config.json").write_text(json.dumps(damaged))
            assert_refused_by_load_and_inspect(slots, path)

    check()
    assert_unchanged(model, before)
