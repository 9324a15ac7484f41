"""The CLI: ``loraswap inspect`` and ``plan`` over mixed-format adapters, exit codes, ``--json``, ``--help``."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import UNET_LORA

import loraswap
from loraswap import cli
from loraswap.demo import DEMO_ADAPTERS, run_demo
from loraswap.plan import capacity_dict
from loraswap.testing.synthetic import tiny_llama, write_peft_adapter
from loraswap.testing.synthetic_diffusers import tiny_unet


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``loraswap ARGS`` in-process through ``cli.main`` on a wide terminal: (exit code, stdout, stderr)."""
    argv = sys.argv
    sys.argv = ["loraswap", *map(str, args)]
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("COLUMNS", "200")
            cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def llama_model_dir(llama_base, tmp_path_factory):
    """The base model as a local transformers folder: its config only, no weights."""
    directory = tmp_path_factory.mktemp("llama-model")
    config = copy.deepcopy(llama_base.config)
    config.architectures = [type(llama_base).__name__]
    config.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    """A tiny random-init Stable Diffusion pipeline and its saved folder (what ``--model`` points at)."""
    from loraswap.testing.synthetic_diffusers import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    directory = tmp_path_factory.mktemp("sd-pipeline")
    pipe.save_pretrained(directory)
    return pipe, directory


def _lora_state_dict(module, **lora_config):
    """A LoRA as PEFT trains it inside diffusers (``add_adapter``), on a copy: PEFT keys, random non-zero factors."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    module = copy.deepcopy(module)
    config = LoraConfig(init_lora_weights=False, **lora_config)
    if hasattr(module, "add_adapter") and not hasattr(module, "peft_config"):
        module.add_adapter(config)
    return get_peft_model_state_dict(module), config


@pytest.fixture(scope="module")
def mixed_folder(llama_adapters, sd_pipeline, tmp_path_factory):
    """A folder of mixed-format adapters: PEFT directories and a lone PEFT file for the Llama, and for the
    pipeline a diffusers file (unet + text encoder, by ``save_lora_weights``) and a kohya file
    (by ``convert_state_dict_to_kohya``)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe, _ = sd_pipeline
    folder = tmp_path_factory.mktemp("mixed")
    for name in ("attn-r2", "mixed-patterns"):
        shutil.copytree(llama_adapters[name], folder / name)
    shutil.copy(llama_adapters["embed-and-v"] / "adapter_model.safetensors", folder / "embed-and-v.safetensors")
    unet_lora, unet_config = _lora_state_dict(pipe.unet, **UNET_LORA)
    torch.manual_seed(1)
    text_config = LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    text_lora = get_peft_model_state_dict(get_peft_model(copy.deepcopy(pipe.text_encoder), text_config))
    StableDiffusionPipeline.save_lora_weights(
        folder / "sd-style",
        unet_lora_layers=unet_lora,
        text_encoder_lora_layers=text_lora,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    kohya_lora, _ = _lora_state_dict(pipe.unet, r=2, lora_alpha=2, target_modules=["to_q", "to_v", "conv1"])
    kohya = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in kohya_lora.items()})
    save_file({key: value.contiguous() for key, value in kohya.items()}, folder / "sd-style-kohya.safetensors")
    return folder


def test_inspect_folder_of_mixed_formats_json(capsys, mixed_folder):
    code, out, err = run_cli(capsys, "inspect", mixed_folder, "--json")
    assert code == 0, err
    infos = {row["source"].rsplit("/", 1)[-1]: row for row in json.loads(out)}
    assert {name: row["format"] for name, row in infos.items()} == {
        "attn-r2": "peft-dir",
        "mixed-patterns": "peft-dir",
        "embed-and-v.safetensors": "peft-safetensors",
        "sd-style": "diffusers",
        "sd-style-kohya.safetensors": "kohya",
    }
    assert infos["mixed-patterns"]["ranks"] == [4, 8, 16]
    assert infos["sd-style-kohya.safetensors"]["components"] == ["unet"]
    assert infos["sd-style"]["components"] == ["text_encoder", "unet"]
    assert set(infos["sd-style"]["scalings"]) == {0.5, 2.0}  # text encoder 4/8, unet 8/4, from the header's configs


def test_plan_pipeline_equals_loraswap_diffusers_attach(capsys, sd_pipeline, mixed_folder):
    from loraswap import diffusers as loraswap_diffusers

    pipe, pipe_dir = sd_pipeline
    files = [mixed_folder / "sd-style", mixed_folder / "sd-style-kohya.safetensors"]
    code, out, err = run_cli(capsys, "plan", *files, "--model", pipe_dir, "--slots", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    expected, _ = loraswap_diffusers.capacities_for(pipe, files, slots=2)
    assert result["capacities"] == json.loads(json.dumps({k: capacity_dict(v) for k, v in expected.items()}))
    attached = loraswap_diffusers.attach(copy.deepcopy(pipe), expected, cache_bytes=0)
    storage = [t for part in attached.components.values() for t in part.storage.tensors]
    assert result["slot_bytes"] * 2 == sum(t.numel() * t.element_size() for t in storage)
    code, out, _ = run_cli(capsys, "plan", mixed_folder, "--model", pipe_dir, "--json")
    fits = {fit["source"].rsplit("/", 1)[-1]: fit["fits"] for fit in json.loads(out)["adapters"]}
    assert code == 1 and fits == {
        "attn-r2": False,
        "mixed-patterns": False,
        "embed-and-v.safetensors": False,
        "sd-style": True,
        "sd-style-kohya.safetensors": True,
    }


def test_inspect_table_names_every_adapter(capsys, mixed_folder):
    code, out, _ = run_cli(capsys, "inspect", mixed_folder / "attn-r2", mixed_folder / "sd-style", "--layers")
    assert code == 0
    assert "peft-dir" in out and "diffusers" in out
    assert "per-layer ranks" in out


@pytest.mark.filterwarnings("ignore:.*lora_bias=True. was passed", "ignore:.*LoRA tensor.s. have invalid shape")
def test_plan_capacity_equals_for_adapters_and_attach_bytes(
    capsys, llama_base, llama_adapters, llama_model_dir, tmp_path
):
    with_bias = write_peft_adapter(
        llama_base, tmp_path / "bias", r=2, lora_alpha=2, target_modules=["k_proj"], lora_bias=True
    )
    paths = [*llama_adapters.values(), with_bias]
    for extra, per_layer_rank in (([], False), (["--per-layer-rank"], True)):
        code, out, err = run_cli(capsys, "plan", *paths, "--model", llama_model_dir, "--slots", "3", "--json", *extra)
        assert code == 0, err
        result = json.loads(out)
        expected = loraswap.Capacity.for_adapters(paths, model=llama_base, slots=3, per_layer_rank=per_layer_rank)
        assert result["capacity"] == json.loads(json.dumps(capacity_dict(expected)))
        model = copy.deepcopy(llama_base)
        slots = loraswap.attach(model, expected, cache_bytes=0)
        device = sum(t.numel() * t.element_size() for t in slots.storage.tensors)
        assert result["slot_bytes"] * 3 == device
        assert result["slot_bytes"] == slots.layout.slot_nbytes
        assert result["host_cache_bytes"] == len(paths) * result["slot_bytes"]
        assert result["capacity"]["lora_bias"] is True
        assert all(fit["fits"] and 0 <= fit["padding_waste"] < 1 for fit in result["adapters"])
    wastes = {fit["source"]: fit["padding_waste"] for fit in result["adapters"]}
    assert wastes[str(llama_adapters["attn-r2"])] > wastes[str(llama_adapters["mlp-r32-rslora"])]


def test_plan_reports_adapters_that_cannot_fit(capsys, llama_base, llama_adapters, llama_model_dir, tmp_path):
    other_model = tiny_llama(hidden=32, layers=2, vocab=96)
    wrong_shapes = write_peft_adapter(
        other_model, tmp_path / "other-base", r=2, lora_alpha=2, target_modules=["q_proj"]
    )
    dora = write_peft_adapter(
        llama_base, tmp_path / "dora", r=2, lora_alpha=2, target_modules=["v_proj"], use_dora=True
    )
    deeper = write_peft_adapter(
        tiny_llama(hidden=64, layers=3, vocab=96), tmp_path / "deeper", r=2, lora_alpha=2, target_modules=["q_proj"]
    )
    sources = [llama_adapters["attn-r2"], wrong_shapes, dora, deeper]
    code, out, _ = run_cli(capsys, "plan", *sources, "--model", llama_model_dir, "--json")
    assert code == 1
    fits = {fit["source"]: fit for fit in json.loads(out)["adapters"]}
    assert fits[str(llama_adapters["attn-r2"])]["fits"]
    assert "another base model" in fits[str(wrong_shapes)]["reason"]
    assert fits[str(dora)]["fits"]  # DoRA is served: the plan reserves its vectors
    assert json.loads(out)["capacity"]["dora"] and json.loads(out)["dora_bytes"] > 0
    assert "model.layers.2" in fits[str(deeper)]["reason"]
    code, out, _ = run_cli(capsys, "plan", llama_adapters["attn-r2"], wrong_shapes, "--model", llama_model_dir)
    assert code == 1 and "│   no │" in out and "│  yes │" in out


def test_plan_on_a_diffusers_model_folder(capsys, tmp_path):
    unet = tiny_unet(channels=8, cross_attention_dim=8)
    unet.save_config(tmp_path / "unet")
    adapter = write_peft_adapter(unet, tmp_path / "unet-lora", r=4, lora_alpha=4, target_modules=["to_q", "conv1"])
    code, out, err = run_cli(capsys, "plan", adapter, "--model", tmp_path / "unet", "--slots", "2", "--json")
    assert code == 0, err
    expected = loraswap.Capacity.for_adapters([adapter], model=unet, slots=2)
    assert json.loads(out)["capacity"] == json.loads(json.dumps(capacity_dict(expected)))
    slots = loraswap.attach(copy.deepcopy(unet), expected, cache_bytes=0)
    assert json.loads(out)["slot_bytes"] == slots.layout.slot_nbytes


def test_plan_dtype_follows_the_option(capsys, llama_adapters, llama_model_dir):
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        code, out, _ = run_cli(
            capsys, "plan", llama_adapters["attn-r2"], "--model", llama_model_dir, "--dtype", dtype, "--json"
        )
        assert code == 0
        sizes[dtype] = json.loads(out)["slot_bytes"]
    assert sizes["bfloat16"] < sizes["float32"]


def _truncated(directory, source):
    path = directory / "truncated.safetensors"
    path.write_bytes(source.read_bytes()[:-64])
    return path


def _not_safetensors(directory, source):
    path = directory / "text.safetensors"
    path.write_text("hello")
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (_truncated, "truncated"),
        (_not_safetensors, "too short"),
        (lambda directory, source: directory / "no-such-adapter", "no such file"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, llama_adapters, tmp_path, make, message):
    bad = make(tmp_path, llama_adapters["attn-r2"] / "adapter_model.safetensors")
    code, out, err = run_cli(capsys, "inspect", bad)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("loraswap: error: ") and message in err
    assert "Traceback" not in err


def test_non_lora_file_exits_2_and_debug_shows_the_exception(capsys, tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "weights.safetensors")
    code, _, err = run_cli(capsys, "inspect", tmp_path / "weights.safetensors")
    assert code == 2 and "no LoRA tensors" in err and err.count("\n") == 1
    with pytest.raises(loraswap.AdapterFormatError):
        run_cli(capsys, "--debug", "inspect", tmp_path / "weights.safetensors")


def test_usage_errors_exit_2(capsys, llama_adapters, llama_model_dir):
    assert run_cli(capsys, "plan", llama_adapters["attn-r2"])[0] == 2  # no --model
    assert run_cli(capsys, "plan", llama_adapters["attn-r2"], "--model", llama_model_dir, "--dtype", "int3")[0] == 2
    assert run_cli(capsys, "plan", llama_adapters["attn-r2"], "--model", llama_model_dir, "--slots", "0")[0] == 2
    assert run_cli(capsys, "inspect", "--no-such-option")[0] == 2
    code, _, err = run_cli(capsys, "plan", llama_adapters["attn-r2"], "--model", llama_adapters["attn-r2"])
    assert code == 2 and "config.json" in err


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


def test_help_on_every_command(capsys):
    import typer

    root = typer.main.get_command(cli.app)
    commands = list(_commands(root))
    assert {("inspect",), ("plan",), ("demo",)} <= set(commands)
    for command in [(), *commands]:
        code, out, _ = run_cli(capsys, *command, "--help")
        assert code == 0 and "Usage" in out, command


def test_python_dash_m_exits_2_on_bad_input(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    result = subprocess.run(
        [sys.executable, "-m", "loraswap", "inspect", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "too short" in result.stderr


def test_version_short_help_and_debug_in_the_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"loraswap {loraswap.__version__}"
    for args in (["-h"], ["inspect", "-h"], ["bench", "swap", "-h"]):
        code, out, _ = run_cli(capsys, *args)
        assert code == 0 and "Usage" in out, args
    code, out, _ = run_cli(capsys, "--help")
    assert "--debug anywhere" in out and "--debug" in out.split("Options")[1]


@pytest.mark.parametrize(
    "args, missing, runner, extra",
    [
        (["bench", "pipeline"], "diffusers", "loraswap.bench.pipeline.run_pipeline_bench", "diffusers"),
        (["bench", "swap", "--plot", "out.png"], "matplotlib", "loraswap.bench.swap.run_swap", "plot"),
        (["demo"], "peft", "loraswap.demo.run_demo", "peft"),
        (["serve", "model", "--adapters", "adapters"], "ray", "loraswap.serve.app.serve_forever", "serve"),
        (["bench", "serve"], "ray", "loraswap.bench.serve.run_serve_bench", "serve"),
    ],
)
def test_a_missing_extra_prints_one_line_before_any_work(capsys, monkeypatch, args, missing, runner, extra):
    def no_work(*args, **kwargs):
        raise AssertionError("the command ran before checking its extra")

    monkeypatch.setattr(runner, no_work)
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError, as when not installed
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and f"needs {missing}" in err and f"pip install 'loraswap[{extra}]'" in err


def test_demo_with_one_round_reports_no_warm_swap_and_shows_progress(capsys):
    assert run_cli(capsys, "demo", "--rounds", "0")[0] == 2
    with pytest.raises(ValueError, match="at least one round"):
        run_demo(rounds=0)
    # the eager backend: what is tested is the demo's report; inductor is exercised in test_core_llama
    code, out, err = run_cli(capsys, "demo", "--rounds", "1", "--json", "--backend", "eager")
    assert code == 0, err
    rows = json.loads(out)
    assert [row["adapter"] for row in rows] == list(DEMO_ADAPTERS)
    assert all(row["warm_swap_median_s"] is None and row["first_load_s"] > 0 for row in rows)
    assert all(row["recompiles"] == 0 and row["max_abs_error"] < 1e-4 for row in rows)
    assert "compiling the model once" in err and "round 1/1" in err


def test_inspect_lists_every_adapter_of_a_folder_and_says_why_one_fails(capsys, llama_adapters, tmp_path):
    shutil.copytree(llama_adapters["attn-r2"], tmp_path / "attn-r2")
    _truncated(tmp_path, llama_adapters["attn-r2"] / "adapter_model.safetensors")
    code, out, err = run_cli(capsys, "inspect", tmp_path)
    assert code == 1, err
    assert "peft-dir" in out and "not readable as LoRA adapters" in out and "truncated" in out
    code, out, _ = run_cli(capsys, "inspect", tmp_path, "--json")
    rows = {row["source"].rsplit("/", 1)[-1]: row for row in json.loads(out)}
    assert code == 1 and rows["attn-r2"]["format"] == "peft-dir"
    assert "truncated" in rows["truncated.safetensors"]["error"]
