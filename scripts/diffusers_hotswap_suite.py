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

The whole set compiles about 85 models with inductor per implementation (minutes each on 2 shared cores), so
it can be run in chunks that add up to both counts: ``--files`` (test files by short name, see TEST_FILES) and
``--subset`` pick a chunk, ``--record FILE`` merges each chunk's outcomes into a JSON file (a rerun of a test
replaces its outcome), ``--log-dir`` streams each pytest run's output (``-v``, durations) to a file as it
comes, and ``--from-record FILE`` prints both counts, per file and in total, and the comparison, running nothing:

    python scripts/diffusers_hotswap_suite.py --files unet --subset compiled --record r.json --log-dir logs \
        -- -v --durations=0
    python scripts/diffusers_hotswap_suite.py --from-record r.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from peft_hotswap_suite import counts, report, run_pytest, summarise

SCRIPTS = Path(__file__).resolve().parent
PEER_TESTS = Path("shared") / "peer-tests" / "diffusers-main-58eb52c0"
# ../shared beside the checkout (/work/main) or above it (a worktree /work/wt/NAME)
DEFAULT_TESTS = next(
    (folder / PEER_TESTS for folder in Path(__file__).resolve().parents[1:] if (folder / PEER_TESTS).is_dir()),
    Path(__file__).resolve().parents[2] / PEER_TESTS,
)
IMPLEMENTATIONS = ("diffusers", "loraswap")
TEST_FILES = {
    "pipelines": "tests/pipelines/test_pipelines.py",
    "unet": "tests/models/unets/test_models_unet_2d_condition.py",
    "flux": "tests/models/transformers/test_models_transformer_flux.py",
    "flux2": "tests/models/transformers/test_models_transformer_flux2.py",
    "chroma": "tests/models/transformers/test_models_transformer_chroma.py",
    "qwenimage": "tests/models/transformers/test_models_transformer_qwenimage.py",
    "motif_video": "tests/models/transformers/test_models_transformer_motif_video.py",
    "nucleusmoe_image": "tests/models/transformers/test_models_transformer_nucleusmoe_image.py",
}
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
# "compiled": the tests that compile (inductor, all but two in a fresh inductor cache); "uncompiled": the others.
COMPILED = "hotswapping_compiled or compile_on_different_shapes or targets_more_layers"
SUBSETS = {
    "ci": "enable_lora_hotswap and (UNet2DCondition or TestLoraHotSwappingForPipeline)",
    "compiled": COMPILED,
    "uncompiled": f"not ({COMPILED})",
}


def test_ids(tests_root: Path, files: list[str]) -> list[str]:
    ids = []
    for test_file in (TEST_FILES[name] for name in files):
        ids += [f"{test_file}::{cls}" for cls in HOTSWAP_CLASS.findall((tests_root / test_file).read_text())]
    return ids


def file_of(test: str) -> str:
    """The TEST_FILES name of a test id from the JUnit XML (``tests.pipelines.test_pipelines.Class::name``)."""
    module = test.split("::")[0].rsplit(".", 1)[0]
    files = {path.removesuffix(".py").replace("/", "."): name for name, path in TEST_FILES.items()}
    return files.get(module, module)


def run_suite(
    root: Path, implementation: str, files: list[str], selection: str | None, extra_args: list[str], log: Path | None
) -> dict:
    """One pytest process over the hotswap classes of ``files``; outcome per test id from its JUnit XML."""
    env = dict(os.environ, LORASWAP_DIFFUSERS_IMPL=implementation, RUN_SLOW="1", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), env.get("PYTHONPATH")]))
    report = root / f"{implementation}.xml"
    command = [
        sys.executable, "-m", "pytest", *test_ids(root, files), "-p", "diffusers_hotswap_plugin", "-p",
        "no:cacheprovider", "-o", "addopts=", "-q", f"--junitxml={report}", *(["-k", selection] if selection else []),
        *extra_args,
    ]  # fmt: skip
    return run_pytest(command, root, env, report, implementation, log)


def merge_record(record_file: Path, runs: dict[str, dict], chunk: dict) -> dict[str, dict]:
    """Add ``runs``' outcomes to the chunk record in ``record_file`` (created if absent); the merged record."""
    record = json.loads(record_file.read_text()) if record_file.exists() else {"chunks": []}
    for name, run in runs.items():
        record.setdefault(name, {}).update(run["outcomes"])
        record["chunks"].append(chunk | {"implementation": name} | summarise({name: run})[name])
    record_file.write_text(json.dumps(record, indent=1, sort_keys=True))
    return record


def counts_by_file(outcomes: dict[str, str]) -> dict[str, dict[str, int]]:
    """Outcome counts per TEST_FILES name, and in ``total``."""
    by_file: dict[str, dict[str, str]] = {}
    for test, outcome in outcomes.items():
        by_file.setdefault(file_of(test), {})[test] = outcome
    tallies = {name: counts(by_file[name]) for name in TEST_FILES if name in by_file}
    return tallies | {"total": counts(outcomes)}


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


def runs_from_record(record: dict) -> dict[str, dict]:
    """A chunk record as the runs :func:`compare` and :func:`report` read (seconds and exit codes over its chunks)."""
    runs = {}
    for name in IMPLEMENTATIONS:
        chunks = [chunk for chunk in record["chunks"] if chunk["implementation"] == name]
        if chunks:
            runs[name] = {
                "outcomes": record.get(name, {}),
                "exit_code": max(chunk["exit_code"] for chunk in chunks),
                "seconds": round(sum(chunk["seconds"] for chunk in chunks), 1),
                "summary": f"{len(chunks)} chunk(s), the last: {chunks[-1]['summary']}",
                "log": "",
            }
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=Path, default=DEFAULT_TESTS, help="a diffusers checkout holding tests/")
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help="run one implementation only")
    parser.add_argument("--subset", choices=sorted(SUBSETS), help="run a named subset (-k expression)")
    parser.add_argument("--files", default=",".join(TEST_FILES), help=f"comma-separated, of: {', '.join(TEST_FILES)}")
    parser.add_argument("--record", type=Path, help="merge this run's outcomes into a JSON chunk record")
    parser.add_argument("--from-record", type=Path, help="report the counts of a chunk record; run nothing")
    parser.add_argument("--log-dir", type=Path, help="stream each pytest run's output to a file in LOG_DIR")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--verbose", action="store_true", help="print each run's pytest output")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    import diffusers

    files = args.files.split(",")
    if unknown := set(files) - set(TEST_FILES):
        parser.error(f"--files: unknown {sorted(unknown)}; known: {', '.join(TEST_FILES)}")
    chunk = {"files": files, "subset": args.subset or "all", "pytest_args": args.pytest_args}
    if args.from_record:
        record = json.loads(args.from_record.read_text())
        runs = runs_from_record(record)
        chunk = {"files": sorted({name for c in record["chunks"] for name in c["files"]}), "subset": "chunk record"}
    else:
        runs = run_chunk(args, files, chunk)
        if args.record:
            merge_record(args.record, runs, chunk)
    problems, excused = compare(runs)
    by_file = {name: counts_by_file(run["outcomes"]) for name, run in runs.items()}
    result = {
        "diffusers_version": diffusers.__version__,
        "tests": str(args.tests),
        "files": chunk["files"],
        "subset": chunk["subset"],
        "runs": summarise(runs),
        "by_file": by_file,
        "intended_differences": excused,
        "problems": problems,
    }
    heading = f"diffusers {diffusers.__version__}, hotswap tests of {args.tests.name} ({result['subset']})"
    notes = [
        f"{file:17s} {name:9s} " + "  ".join(f"{kind} {count:3d}" for kind, count in tally.items())
        for name, tallies in by_file.items()
        for file, tally in tallies.items()
    ] + [f"intended difference: {line}" for line in excused]
    return report(result, runs, heading, notes, "OK: loraswap passes every test diffusers passes", args)


def run_chunk(args: argparse.Namespace, files: list[str], chunk: dict) -> dict[str, dict]:
    """Run the chunk (``files`` x ``--subset``) once per implementation, in a copy of the tests folder."""
    label = f"{'+'.join(files) if len(files) < len(TEST_FILES) else 'all'}-{chunk['subset']}-{time.strftime('%H%M%S')}"
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffusers-hotswap-suite-") as temporary:
        root = Path(temporary)
        shutil.copytree(args.tests / "tests", root / "tests")
        return {
            name: run_suite(
                root, name, files, SUBSETS.get(args.subset), args.pytest_args,
                args.log_dir / f"{name}-{label}.log" if args.log_dir else None,
            )
            for name in ([args.only] if args.only else IMPLEMENTATIONS)
        }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
