"""What ``inspect`` (and so ``plan`` and ``Capacity.for_adapters``) accepts, a load accepts, and the other way round.

Every kind of adapter the tests build goes through both: PEFT folders and lone files (``load_adapter``), diffusers,
legacy diffusers and kohya files (the pipeline reader), refused features, damaged files, pickles and folders that
hold no adapter. Both must accept it, or both refuse it with the same error class; where both accept, they must see
the same layers with the same ranks and scalings. Both read through :mod:`loraswap.formats`, so a rule changed in one
place changes for both.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraswap
from loraswap.errors import HotswapError
from loraswap.testing.synthetic import write_peft_adapter
from loraswap.testing.synthetic_diffusers import LoraSpec, tiny_sd_pipeline, write_diffusers_lora, write_kohya_lora

PIPELINE_FORMATS = ("diffusers", "kohya", "xlabs")


def _outcome(read):
    try:
        return read(), None
    except HotswapError as err:
        return None, type(err)


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _with_config(source: Path, target: Path, **options) -> Path:
    _copy(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **options}))
    return target


def _renamed_weights(source: Path, target: Path, name: str) -> Path:
    _copy(source, target)
    (target / "adapter_model.safetensors").rename(target / name)
    return target


def _truncated(source: Path, target: Path) -> Path:
    _copy(source, target)
    weights = target / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    return target


def _pickled(source: Path, target: Path) -> Path:
    _copy(source, target)
    weights = target / "adapter_model.safetensors"
    torch.save(load_file(weights), target / "adapter_model.bin")
    weights.unlink()
    return target


def _lone_file(source: Path, target: Path) -> Path:
    shutil.copy(source / "adapter_model.safetensors", target)
    return target


def _config_only(source: Path, target: Path) -> Path:
    target.mkdir()
    shutil.copy(source / "adapter_config.json", target)
    return target


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def fixture_adapters(llama_base, llama_adapters, sd_pipe, tmp_path_factory):
    """Name -> an adapter source, one of each kind the tests build."""
    directory = tmp_path_factory.mktemp("agreement")
    plain = llama_adapters["mixed-patterns"]
    sources = {f"peft-dir {name}": path for name, path in llama_adapters.items()}
    sources.update(
        {
            "peft lone file": _lone_file(plain, directory / "lone.safetensors"),
            "peft lone embedding file": _lone_file(llama_adapters["embed-and-v"], directory / "embed.safetensors"),
            "peft dir, weights under another name": _renamed_weights(plain, directory / "renamed", "weights.safetensors"),
            "peft dir, diffusers weights name": _renamed_weights(
                plain, directory / "diffusers-name", "pytorch_lora_weights.safetensors"
            ),
            "peft dir with lora bias": write_peft_adapter(
                llama_base, directory / "bias", r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True
            ),
            "DoRA config": _with_config(plain, directory / "dora", use_dora=True),
            "PiSSA config": _with_config(plain, directory / "pissa", init_lora_weights="pissa"),
            "damaged config": _with_config(plain, directory / "bad-r", r="eight"),
            "rank not the config's": _with_config(plain, directory / "wrong-r", r=3, rank_pattern={}),
            "truncated weights": _truncated(plain, directory / "truncated"),
            "pickled weights": _pickled(plain, directory / "pickled"),
            "config without weights": _config_only(plain, directory / "config-only"),
            "missing path": directory / "nothing-here",
            "unknown file type": directory / "notes.txt",
        }
    )
    (directory / "notes.txt").write_text("not an adapter")
    spec = LoraSpec(targets={"unet": ["to_q", "to_v", "proj_in"], "text_encoder": ["q_proj", "v_proj"]},
                    rank=4, alpha=8.0, rank_pattern={"proj_in": 2}, alpha_pattern={"to_v": 2.0})  # fmt: skip
    sources["diffusers file"] = write_diffusers_lora(sd_pipe, directory / "diffusers", spec)
    sources["kohya file"] = write_kohya_lora(sd_pipe, directory / "kohya.safetensors", spec)
    kohya = load_file(sources["kohya file"])
    dora = {**kohya, next(k for k in kohya if k.endswith(".alpha")).replace(".alpha", ".dora_scale"): torch.ones(1, 4)}
    save_file(dora, directory / "kohya-dora.safetensors")
    sources["kohya file with dora_scale"] = directory / "kohya-dora.safetensors"
    return sources


def _load(source, sd_pipe, file_format):
    if file_format in PIPELINE_FORMATS:
        from loraswap.diffusers import read_pipeline_adapter

        return read_pipeline_adapter(sd_pipe, source)
    return loraswap.load_adapter(source)


def _pipeline_file_format(source) -> str | None:
    """The format inspect gives a file that loads through the pipeline reader (None for PEFT or unreadable)."""
    info, _ = _outcome(lambda: loraswap.inspect(source))
    return info.format if info is not None and info.format in PIPELINE_FORMATS else None


CASES = [
    "peft-dir attn-r2", "peft-dir mlp-r32-rslora", "peft-dir mixed-patterns", "peft-dir embed-and-v",
    "peft lone file", "peft lone embedding file", "peft dir, weights under another name",
    "peft dir, diffusers weights name", "peft dir with lora bias", "DoRA config", "PiSSA config", "damaged config",
    "rank not the config's", "truncated weights", "pickled weights", "config without weights", "missing path",
    "unknown file type", "diffusers file", "kohya file", "kohya file with dora_scale",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_inspect_and_load_agree_on_every_fixture_adapter(fixture_adapters, sd_pipe, case):
    source = fixture_adapters[case]
    file_format = _pipeline_file_format(source)
    info, inspect_error = _outcome(lambda: loraswap.inspect(source))
    loaded, load_error = _outcome(lambda: _load(source, sd_pipe, file_format))
    if info is not None and info.unsupported:  # inspect describes what a load refuses, naming the feature
        assert load_error is loraswap.UnsupportedAdapterError, (info.unsupported, load_error)
        return
    assert inspect_error is load_error, (inspect_error, load_error)
    if loaded is None:
        return
    if file_format is None:  # one model's adapter: the same layers, ranks and scalings, by name
        assert info.layer_ranks == {name: layer.rank for name, layer in loaded.layers.items()}
        for name, layer in loaded.layers.items():
            assert math.isclose(info.layers[name].scaling, layer.scaling, rel_tol=1e-6), name
        assert info.has_bias == loaded.has_bias
        return
    # a pipeline file: the same components, ranks and scalings (the reader names layers in PEFT's terms)
    assert set(info.components) == set(loaded.components)
    assert set(info.ranks) == {layer.rank for adapter in loaded.components.values() for layer in adapter.layers.values()}
    loaded_scalings = {round(layer.scaling, 6) for a in loaded.components.values() for layer in a.layers.values()}
    assert {round(scaling, 6) for scaling in info.scalings} == loaded_scalings
    assert len(info.layers) == sum(len(adapter.layers) for adapter in loaded.components.values())


def test_every_fixture_case_is_checked(fixture_adapters):
    assert sorted(CASES) == sorted(fixture_adapters)
