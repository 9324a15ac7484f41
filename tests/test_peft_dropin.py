"""loraswap.peft against PEFT's own hotswap functions, on PEFT-written adapters.

Every check compares with a real reference: PEFT's ``peft.utils.hotswap`` run on an identical
model, or ``PeftModel.from_pretrained`` with the adapter loaded the ordinary way.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import peft
import peft.utils.hotswap as peft_hotswap
from peft import LoraConfig, PeftModel, get_peft_model

import loraswap
import loraswap.peft as drop_in
from loraswap.peft.common import PEFT_VERSION

REPO = Path(__file__).resolve().parents[1]
INPUTS = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class LinearThenConv1d(nn.Module):
    """``lin0`` sorts before ``proj``: PEFT swaps lin0's weights before it rejects the Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 12)
        self.proj = nn.Conv1d(3, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.lin0(x).reshape(-1, 3, 4))


def base(model_class=MLP) -> nn.Module:
    torch.manual_seed(0)
    return model_class().eval()


def write_adapter(path: Path, seed: int, model_class=MLP, adapter_names=("default",), **config) -> Path:
    """A PEFT adapter with random non-zero weights, written by PEFT's ``save_pretrained``."""
    torch.manual_seed(seed)
    config.setdefault("init_lora_weights", False)
    model = get_peft_model(base(model_class), LoraConfig(**config), adapter_name=adapter_names[0])
    for name in adapter_names[1:]:
        model.add_adapter(name, LoraConfig(**config))
    model.save_pretrained(str(path))
    return path


def reference_output(path: Path, model_class=MLP, inputs=INPUTS) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(base(model_class), str(path)).eval()(inputs)


def loaded(path: Path, model_class=MLP) -> nn.Module:
    return PeftModel.from_pretrained(base(model_class), str(path)).eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model and every LoRA scaling, copied."""
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for name, module in model.named_modules():
        for adapter, scaling in getattr(module, "scaling", {}).items():
            state[f"{name}.scaling.{adapter}:{type(scaling).__name__}"] = torch.as_tensor(scaling).clone()
    return state


def assert_same_state(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    changed = [
        key for key in before if before[key].shape != after[key].shape or not torch.equal(before[key], after[key])
    ]
    assert not changed, f"changed: {changed}"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("peft-dropin")
    specs = {
        "r4": {"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"]},
        "r8-lin0": {"r": 8, "lora_alpha": 4, "target_modules": ["lin0"]},
        "r2": {"r": 2, "lora_alpha": 6, "target_modules": ["lin0", "lin1"]},
        "r8": {"r": 8, "lora_alpha": 16, "target_modules": ["lin0", "lin1"]},
        "r16-alpha32": {"r": 16, "lora_alpha": 32, "target_modules": ["lin0", "lin1"]},
        "rank-pattern": {"r": 8, "lora_alpha": 9, "target_modules": ["lin0", "lin1"], "rank_pattern": {"lin1": 4}},
        "lin1-only": {"r": 4, "lora_alpha": 8, "target_modules": ["lin1"]},
        "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["lin0", "lin1"]},
    }
    return {name: write_adapter(directory / name, seed, **spec) for seed, (name, spec) in enumerate(specs.items())}


def test_signatures_are_peft_s():
    """Same parameters, kinds and defaults as PEFT's; loraswap adds keyword-only parameters at the end only."""
    for name in ("prepare_model_for_compiled_hotswap", "hotswap_adapter", "hotswap_adapter_from_state_dict"):
        theirs = list(inspect.signature(getattr(peft_hotswap, name)).parameters.values())
        ours = list(inspect.signature(getattr(drop_in, name)).parameters.values())
        assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
            (p.name, p.kind, p.default) for p in theirs
        ]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs) :])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_same_outputs_as_peft_functions(adapters, compiled):
    """PEFT's functions and loraswap's, same adapters in the same order: identical outputs, zero recompiles."""
    sequence = ["r8-lin0", "r2", "r4", "r8", "r8-lin0"]
    outputs = {}
    for implementation in (peft_hotswap, drop_in):
        torch._dynamo.reset()
        model = loaded(adapters["r4"])
        implementation.prepare_model_for_compiled_hotswap(model, target_rank=8)
        model = torch.compile(model, backend="aot_eager") if compiled else model  # recompiles are dynamo's guards
        with torch.no_grad():
            model(INPUTS)
            with torch._dynamo.config.patch(error_on_recompile=True):
                results = []
                for name in sequence:
                    implementation.hotswap_adapter(model, str(adapters[name]), adapter_name="default")
                    results.append(model(INPUTS))
        outputs[implementation.__name__] = results
    for name, ours, theirs in zip(sequence, outputs["loraswap.peft"], outputs["peft.utils.hotswap"]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours, reference_output(adapters[name]), rtol=1e-5, atol=1e-5)


def test_repeated_swaps_come_from_the_host_cache(adapters, monkeypatch):
    reads = []
    monkeypatch.setattr(
        drop_in.hotswap, "load_peft_weights", lambda *a, **k: reads.append(a[0]) or peft.utils.load_peft_weights(*a, **k)
    )
    model = loaded(adapters["r4"])
    drop_in.prepare_model_for_compiled_hotswap(model, target_rank=8)
    sequence = ["r2", "r8", "r2", "r8", "r4", "r2"]
    with torch.no_grad():
        for name in sequence:
            drop_in.hotswap_adapter(model, str(adapters[name]), adapter_name="default")
            torch.testing.assert_close(model(INPUTS), reference_output(adapters[name]), rtol=1e-5, atol=1e-5)
    assert sorted(reads) == sorted(str(adapters[name]) for name in ("r2", "r8", "r4"))


def test_rewritten_adapter_file_is_read_again(tmp_path):
    write_adapter(tmp_path / "first", 1, r=4, lora_alpha=8, target_modules=["lin0", "lin1"])
    model = loaded(tmp_path / "first")
    write_adapter(tmp_path / "swap", 2, r=4, lora_alpha=8, target_modules=["lin0", "lin1"])
    drop_in.hotswap_adapter(model, str(tmp_path / "swap"), adapter_name="default")
    write_adapter(tmp_path / "swap", 3, r=4, lora_alpha=8, target_modules=["lin0", "lin1"])
    drop_in.hotswap_adapter(model, str(tmp_path / "swap"), adapter_name="default")
    with torch.no_grad():
        torch.testing.assert_close(model(INPUTS), reference_output(tmp_path / "swap"), rtol=1e-5, atol=1e-5)


def _first_adapter_with_lin1_missing(path: Path) -> Path:
    return write_adapter(path, 5, r=4, lora_alpha=8, target_modules=["lin0"])


ERROR_CASES = {
    "rank above target_rank": (
        lambda a, tmp: loaded(a["r8"]),
        lambda fns, model, a, tmp: fns.prepare_model_for_compiled_hotswap(model, target_rank=6),
    ),
    "rank pattern above target_rank": (
        lambda a, tmp: loaded(a["rank-pattern"]),
        lambda fns, model, a, tmp: fns.prepare_model_for_compiled_hotswap(model, target_rank=5),
    ),
    "already compiled": (
        lambda a, tmp: torch.compile(loaded(a["r4"])),
        lambda fns, model, a, tmp: fns.prepare_model_for_compiled_hotswap(model),
    ),
    "bad check_compiled": (
        lambda a, tmp: torch.compile(loaded(a["r4"])),
        lambda fns, model, a, tmp: fns.prepare_model_for_compiled_hotswap(model, check_compiled="loud"),
    ),
    "no adapter": (
        lambda a, tmp: base(),
        lambda fns, model, a, tmp: fns.prepare_model_for_compiled_hotswap(model, target_rank=8),
    ),
    "incompatible configs": (
        lambda a, tmp: loaded(a["r4"]),
        lambda fns, model, a, tmp: fns.hotswap_adapter(model, str(a["rslora"]), adapter_name="default"),
    ),
    "unknown adapter name": (
        lambda a, tmp: loaded(a["r4"]),
        lambda fns, model, a, tmp: fns.hotswap_adapter(model, str(a["r2"]), adapter_name="other"),
    ),
    "targets the first adapter lacks": (
        lambda a, tmp: loaded(_first_adapter_with_lin1_missing(tmp / "lin0-only")),
        lambda fns, model, a, tmp: fns.hotswap_adapter(model, str(a["r4"]), adapter_name="default"),
    ),
    "adapter is merged": (
        lambda a, tmp: _merged(loaded(a["r4"])),
        lambda fns, model, a, tmp: fns.hotswap_adapter(model, str(a["r2"]), adapter_name="default"),
    ),
    "missing adapter directory": (
        lambda a, tmp: loaded(a["r4"]),
        lambda fns, model, a, tmp: fns.hotswap_adapter(model, str(tmp / "nowhere"), adapter_name="default"),
    ),
}


def _merged(model: nn.Module) -> nn.Module:
    model.merge_adapter()
    return model


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_paths_raise_peft_s_type_and_message_and_change_nothing(adapters, tmp_path, case):
    build, call = ERROR_CASES[case]
    errors = {}
    for implementation in (peft_hotswap, drop_in):
        model = build(adapters, tmp_path)
        before = snapshot(model)
        with pytest.raises(Exception) as caught:
            call(implementation, model, adapters, tmp_path)
        errors[implementation.__name__] = (type(caught.value), str(caught.value))
        if implementation is drop_in:
            assert_same_state(before, snapshot(model))
    assert errors["loraswap.peft"] == errors["peft.utils.hotswap"]


def test_failed_swap_is_transactional_where_peft_leaves_the_model_half_swapped(tmp_path):
    """A smaller-rank Conv1d is PEFT's NotImplementedError; PEFT has already swapped lin0 when it raises."""
    first = write_adapter(tmp_path / "first", 1, LinearThenConv1d, r=8, lora_alpha=8, target_modules=["lin0", "proj"])
    second = write_adapter(tmp_path / "second", 2, LinearThenConv1d, r=4, lora_alpha=8, target_modules=["lin0", "proj"])
    errors = {}
    for implementation in (peft_hotswap, drop_in):
        model = loaded(first, LinearThenConv1d)
        before = snapshot(model)
        with pytest.raises(NotImplementedError) as caught:
            implementation.hotswap_adapter(model, str(second), adapter_name="default")
        errors[implementation.__name__] = str(caught.value)
        after = snapshot(model)
        lin0_A = "base_model.model.lin0.lora_A.default.weight"
        proj_A = "base_model.model.proj.lora_A.default.weight"
        if implementation is peft_hotswap:
            assert not torch.equal(before[lin0_A], after[lin0_A]), "PEFT swapped lin0 before it raised"
            assert torch.equal(before[proj_A], after[proj_A])
        else:
            assert_same_state(before, after)
    assert errors["loraswap.peft"] == errors["peft.utils.hotswap"]


def test_swapping_foo_leaves_foobar_alone(tmp_path):
    """PEFT issue 3780: PEFT before 0.22 picks the adapter's keys by substring, so swapping ``foo`` zeroes ``foobar``.

    loraswap never does, on any PEFT; where the installed PEFT keeps ``foobar`` too, both models end equal.
    """
    first = write_adapter(tmp_path / "first", 1, adapter_names=("foo", "foobar"), r=4, target_modules=["lin0", "lin1"])
    swap = write_adapter(tmp_path / "swap", 2, r=4, target_modules=["lin0", "lin1"])
    foobar_lost, states = {}, {}
    for implementation in (peft_hotswap, drop_in):
        model = PeftModel.from_pretrained(base(), str(first / "foo"), adapter_name="foo")
        model.load_adapter(str(first / "foobar"), adapter_name="foobar")
        foobar = {k: v.clone() for k, v in model.state_dict().items() if ".foobar." in k}
        implementation.hotswap_adapter(model, str(swap), adapter_name="foo")
        foobar_lost[implementation.__name__] = any(
            not torch.equal(value, model.state_dict()[key]) for key, value in foobar.items()
        )
        states[implementation.__name__] = snapshot(model)
        if implementation is drop_in:
            with torch.no_grad():
                torch.testing.assert_close(model(INPUTS), reference_output(swap), rtol=1e-5, atol=1e-5)
    assert not foobar_lost["loraswap.peft"]
    if not foobar_lost["peft.utils.hotswap"]:
        assert_same_state(states["peft.utils.hotswap"], states["loraswap.peft"])


def test_rank_pattern_scaling_follows_the_module_name(adapters):
    """PEFT issue 3738: lin1 has rank 4 by rank_pattern, so its scaling is 9 / 4, not 9 / 8 (PEFT before 0.22).

    loraswap gives 9 / 4 on any PEFT, and PEFT's scaling wherever the installed PEFT gets it right.
    """
    scalings = {}
    for implementation in (peft_hotswap, drop_in):
        model = loaded(adapters["r8"])
        implementation.hotswap_adapter(model, str(adapters["rank-pattern"]), adapter_name="default")
        scalings[implementation.__name__] = float(model.base_model.model.lin1.scaling["default"])
        if implementation is drop_in:
            with torch.no_grad():
                torch.testing.assert_close(
                    model(INPUTS), reference_output(adapters["rank-pattern"]), rtol=1e-5, atol=1e-5
                )
    reference = float(loaded(adapters["rank-pattern"]).base_model.model.lin1.scaling["default"])
    assert scalings["loraswap.peft"] == reference == 9 / 4
    assert scalings["peft.utils.hotswap"] in (reference, 9 / 8)  # 9 / 8: the bug, before PEFT 0.22


def test_peft_config_describes_the_loaded_adapter(adapters, tmp_path):
    """PEFT issue 3581: after swapping rank 4 / alpha 8 for rank 16 / alpha 32, save and reload give the same model."""
    configs = {}
    for implementation in (peft_hotswap, drop_in):
        model = loaded(adapters["r4"])
        implementation.hotswap_adapter(model, str(adapters["r16-alpha32"]), adapter_name="default")
        config = model.peft_config["default"]
        configs[implementation.__name__] = (config.r, config.lora_alpha, model.base_model.model.lin0.r["default"])
    assert configs == {"peft.utils.hotswap": (4, 8, 4), "loraswap.peft": (16, 32, 16)}
    model.save_pretrained(str(tmp_path / "saved"))
    with torch.no_grad():
        torch.testing.assert_close(
            reference_output(tmp_path / "saved"), reference_output(adapters["r16-alpha32"]), rtol=1e-6, atol=1e-6
        )


def test_wider_target_modules_let_later_adapters_target_new_layers(adapters):
    """loraswap's extra: prepare with target_modules; the default keeps PEFT's RuntimeError."""
    model = loaded(adapters["r8-lin0"])
    with pytest.raises(RuntimeError, match="unexpected keys found"):
        drop_in.hotswap_adapter(model, str(adapters["lin1-only"]), adapter_name="default")
    with torch.no_grad():
        before = model(INPUTS)
        drop_in.prepare_model_for_compiled_hotswap(model, target_rank=8, target_modules=["lin0", "lin1"])
        torch.testing.assert_close(model(INPUTS), before, rtol=0, atol=0)
        compiled = torch.compile(model, backend="aot_eager")
        compiled(INPUTS)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("lin1-only", "r4", "r8-lin0", "r2"):
                drop_in.hotswap_adapter(compiled, str(adapters[name]), adapter_name="default")
                torch.testing.assert_close(compiled(INPUTS), reference_output(adapters[name]), rtol=1e-5, atol=1e-5)


def _lora_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if ".lora_" in name)


def test_union_of_targets_compared_with_peft_create_dummy_lora_config(adapters, tmp_path):
    """Adapters that target different layers: PEFT 0.22's ``create_dummy_lora_config`` against loraswap's plan.

    Both serve every adapter exactly, without recompiling. PEFT's dummy pads every layer to the largest rank and
    takes lists of names only; loraswap plans from the adapters themselves (a regex target included) and sizes
    each layer to its own largest rank. PEFT before 0.22 has no such helper at all.
    """
    helpers = importlib.import_module("peft.helpers")
    has_dummy = hasattr(helpers, "create_dummy_lora_config")
    assert has_dummy == (PEFT_VERSION.release >= (0, 22))
    regex = write_adapter(tmp_path / "regex", 11, r=2, lora_alpha=4, target_modules=r".*lin1")
    paths = [adapters["r8-lin0"], adapters["lin1-only"], regex]

    capacity = loraswap.Capacity.for_adapters(paths, model=base(), per_layer_rank=True)
    assert set(capacity.target_modules) == {"lin0", "lin1"} and dict(capacity.layer_ranks) == {"lin0": 8, "lin1": 4}
    model = base()
    slots = loraswap.attach(model, capacity)
    compiled = torch.compile(model, backend="eager")
    loraswap_bytes = sum(t.numel() * t.element_size() for name, t in model.named_buffers() if ".lora_" in name)
    assert loraswap_bytes == 4 * (8 * (10 + 20) + 4 * (20 + 5))  # fp32: lin0 at rank 8, lin1 at rank 4
    with torch.no_grad():
        compiled(INPUTS)  # compiles (another test may have compiled the same code with another backend)
    with torch.no_grad(), loraswap.no_recompile():
        for path in paths:
            slots.load(path, slot=0)
            torch.testing.assert_close(compiled(INPUTS), reference_output(path), rtol=1e-5, atol=1e-5)

    if not has_dummy:
        return
    list_targeted = paths[:2]
    dummy = helpers.create_dummy_lora_config([LoraConfig.from_pretrained(str(path)) for path in list_targeted])
    assert set(dummy.target_modules) == {"lin0", "lin1"} and dummy.r == 8
    peft_model = get_peft_model(base(), dummy).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(INPUTS), base()(INPUTS))  # the dummy adds nothing
    peft_hotswap.prepare_model_for_compiled_hotswap(peft_model, target_rank=8, config=dummy)
    compiled_peft = torch.compile(peft_model, backend="eager")
    with torch.no_grad():
        compiled_peft(INPUTS)
    with torch.no_grad(), loraswap.no_recompile():
        for path in list_targeted:
            peft_hotswap.hotswap_adapter(peft_model, str(path), adapter_name="default")
            torch.testing.assert_close(compiled_peft(INPUTS), reference_output(path), rtol=1e-5, atol=1e-5)
    assert _lora_bytes(peft_model) > loraswap_bytes  # every layer at rank 8; loraswap's lin1 holds rank 4
    with pytest.raises(ValueError, match="target_modules"):
        helpers.create_dummy_lora_config([LoraConfig.from_pretrained(str(path)) for path in paths])


def test_from_state_dict_matches_peft(adapters):
    from peft.utils import load_peft_weights

    state_dict = {
        key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): value
        for key, value in load_peft_weights(str(adapters["r2"]), device="cpu").items()
    }
    config = LoraConfig.from_pretrained(str(adapters["r2"]))
    outputs = []
    for implementation in (peft_hotswap, drop_in):
        model = loaded(adapters["r4"])
        implementation.hotswap_adapter_from_state_dict(model, dict(state_dict), "default", config)
        with torch.no_grad():
            outputs.append(model(INPUTS))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


def test_diffusers_model_hotswap_goes_through_loraswap(monkeypatch):
    """diffusers' ``load_lora_adapter(hotswap=True)`` imports PEFT's functions at call time: with loraswap's set
    there, a compiled UNet swaps without recompiling and matches diffusers' ordinary load. (dynamo with the eager
    backend: its guards decide recompilation; inductor is exercised in test_core_llama and test_fused.)"""
    from peft.utils import get_peft_model_state_dict

    from loraswap.testing.synthetic_diffusers import tiny_unet

    def unet():
        return tiny_unet(channels=8, cross_attention_dim=16)

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    lora_state = {}
    for seed, rank in ((1, 4), (2, 8)):
        model = unet()
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=targets, init_lora_weights=False))
        lora_state[rank] = {f"unet.{k}": v.clone() for k, v in get_peft_model_state_dict(model).items()}
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(1))

    references = {}
    for rank, state in lora_state.items():
        model = unet()
        model.load_lora_adapter(dict(state), prefix="unet", adapter_name="default_0")
        with torch.no_grad():
            references[rank] = model(sample, 1, hidden).sample

    swaps = []

    def counted_swap(*args, **kwargs):
        swaps.append(kwargs["adapter_name"])
        return drop_in.hotswap_adapter_from_state_dict(*args, **kwargs)

    monkeypatch.setattr(peft_hotswap, "prepare_model_for_compiled_hotswap", drop_in.prepare_model_for_compiled_hotswap)
    monkeypatch.setattr(peft_hotswap, "hotswap_adapter_from_state_dict", counted_swap)
    model = unet()
    model.enable_lora_hotswap(target_rank=8)
    model.load_lora_adapter(dict(lora_state[4]), prefix="unet", adapter_name="default_0")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(sample, 1, hidden).sample, references[4], rtol=1e-5, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for rank in (8, 4, 8):
                model.load_lora_adapter(dict(lora_state[rank]), prefix="unet", adapter_name="default_0", hotswap=True)
                torch.testing.assert_close(compiled(sample, 1, hidden).sample, references[rank], rtol=1e-5, atol=1e-5)
    assert swaps == ["default_0"] * 3


def test_peft_reference_suite_passes_with_loraswap():
    """PEFT's own TestHotSwapping, downloaded from PyPI, run with PEFT's functions and with loraswap's.

    Fails (never skips) when the sdist cannot be downloaded or the suite cannot run.
    """
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "peft_hotswap_suite.py")], check=False, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr[-4000:]
    assert "OK: loraswap.peft passes every test PEFT's functions pass" in completed.stdout
