"""Run diffusers' own hotswap tests against diffusers' implementation and against loraswap's, and compare.

The spec: ``LoraHotSwappingForModelTesterMixin`` with the model test classes that use it (UNet2DCondition,
Flux, Flux2, Chroma, QwenImage, MotifVideo, NucleusMoEImage) and ``TestLoraHotSwappingForPipeline``,
from diffusers' repository at the commit in ``--tests`` (default ``../shared/peer-tests/diffusers-main-58eb52c0`` beside the checkout;
the sdist ships no tests; nothing of them is copied into this repository). The tests folder is copied to a
temporary directory and run twice in fresh pytest processes, through ``scripts/diffusers_hotswap_plugin.py``
(lifts only the accelerator marker, serves ``hf-internal-testing/tiny-sd-pipe`` locally; with loraswap,
routes diffusers' ``enable_lora_hotswap`` to loraswap). Exits non-zero unless both runs collected tests and
every test that passes with diffusers passes with loraswap, except :data:`INTENDED_DIFFERENCES`.

    python scripts/diffusers_hotswap_suite.py                   # the whole set, both runs
    python scripts/diffusers_hotswap_suite.py --subset ci       # the CI subset (see SUBSETS)
    python scripts/diffusers_hotswap_suite.py --json -- -x      # extra pytest arguments after --
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from peft_hotswap_suite import report, run_pytest, summarise

SCRIPTS = Path(__file__).resolve().parent
DEFAULT_TESTS = Path(__file__).resolve().parents[2] / "shared" / "peer-tests" / "diffusers-main-58eb52c0"  # ../shared beside the checkout
IMPLEMENTATIONS = ("diffusers", "loraswap")
TEST_FILES = (
    "tests/pipelines/test_pipelines.py",
    "tests/models/unets/test_models_unet_2d_condition.py",
    "tests/models/transformers/test_models_transformer_flux.py",
    "tests/models/transformers/test_models_transformer_flux2.py",
    "tests/models/transformers/test_models_transformer_chroma.py",
    "tests/models/transformers/test_models_transformer_qwenimage.py",
    "tests/models/transformers/test_models_transformer_motif_video.py",
    "tests/models/transformers/test_models_transformer_nucleusmoe_image.py",
)
HOTSWAP_CLASS = re.compile(r"^class (\w*Hot[Ss]wap\w*)\(", re.MULTILINE)
# Tests that pass with diffusers and assert a limit loraswap lifts on purpose, or a PEFT internal.
INTENDED_DIFFERENCES = {
    "test_hotswap_second_adapter_targets_more_layers_raises": (
        "asserts that a second LoRA targeting layers the first did not is refused (PEFT's RuntimeError); "
        "loraswap sizes the capacity from the first LoRA plus the usual LoRA layers and loads it"
    ),
}
# The CI subset: diffusers' enable_lora_hotswap contract (check_compiled errors, warning, take-over) on the
# UNet and the SD pipeline, which compiles nothing; the compiled swaps (inductor, minutes each on 2 shared
# cores) run in the whole set, and tests/test_diffusers_dropin.py checks them with the eager backend.
SUBSETS = {"ci": "enable_lora_hotswap and (UNet2DCondition or TestLoraHotSwappingForPipeline)"}


def test_ids(tests_root: Path) -> list[str]:
    ids = []
    for test_file in TEST_FILES:
        ids += [f"{test_file}::{cls}" for cls in HOTSWAP_CLASS.findall((tests_root / test_file).read_text())]
    return ids


def run_suite(root: Path, implementation: str, report: Path, selection: str | None, extra_args: list[str]) -> dict:
    """One pytest process over the hotswap classes; outcome per test id from its JUnit XML."""
    env = dict(os.environ, LORASWAP_DIFFUSERS_IMPL=implementation, RUN_SLOW="1", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "pytest", *test_ids(root), "-p", "diffusers_hotswap_plugin", "-p", "no:cacheprovider",
        "-o", "addopts=", "-q", f"--junitxml={report}", *(["-k", selection] if selection else []), *extra_args,
    ]  # fmt: skip
    return run_pytest(command, root, env, report, implementation)


def compare(runs: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(every reason the comparison fails, the intended differences seen)."""
    problems = [
        f"{name}: no test ran (exit code {run['exit_code']}): {run['summary']}"
        for name, run in runs.items()
        if not run["outcomes"]
    ]
    excused = []
    if "diffusers" in runs and "loraswap" in runs:
        reference, candidate = runs["diffusers"]["outcomes"], runs["loraswap"]["outcomes"]
        for test, outcome in sorted(reference.items()):
            if outcome != "passed" or candidate.get(test) == "passed":
                continue
            reason = next((why for name, why in INTENDED_DIFFERENCES.items() if test.endswith(f"::{name}")), None)
            if reason:
                excused.append(f"{test}: {reason}")
            else:
                problems.append(f"passes with diffusers, not with loraswap: {test}")
    return problems, excused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=Path, default=DEFAULT_TESTS, help="a diffusers checkout holding tests/")
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help="run one implementation only")
    parser.add_argument("--subset", choices=sorted(SUBSETS), help="run a named subset (-k expression)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--verbose", action="store_true", help="print each run's pytest output")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    import diffusers

    selection = SUBSETS.get(args.subset)
    with tempfile.TemporaryDirectory(prefix="diffusers-hotswap-suite-") as temporary:
        root = Path(temporary)
        shutil.copytree(args.tests / "tests", root / "tests")
        implementations = [args.only] if args.only else list(IMPLEMENTATIONS)
        runs = {
            name: run_suite(root, name, root / f"{name}.xml", selection, args.pytest_args) for name in implementations
        }
    problems, excused = compare(runs)
    result = {
        "diffusers_version": diffusers.__version__,
        "tests": str(args.tests),
        "subset": args.subset or "all",
        "runs": summarise(runs),
        "intended_differences": excused,
        "problems": problems,
    }
    heading = f"diffusers {diffusers.__version__}, hotswap tests of {args.tests.name} ({result['subset']})"
    notes = [f"intended difference: {line}" for line in excused]
    return report(result, runs, heading, notes, "OK: loraswap passes every test diffusers passes", args)

if __name__ == "__main__":
    sys.exit(main())
