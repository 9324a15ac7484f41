"""Run PEFT's own hotswap tests against PEFT's functions and against loraswap.peft's, and compare.

PEFT's ``TestHotSwapping`` (``tests/test_initialization.py`` of the PEFT sdist) is the spec of
``loraswap.peft``. This script downloads the sdist of the installed PEFT version into a temporary
directory (``pip download --no-deps --no-binary :all: peft==VERSION``), runs the class twice in
fresh pytest processes, once as is and once with loraswap.peft's functions set on
``peft.utils.hotswap`` by ``scripts/peft_hotswap_plugin.py`` before the tests import them, and
exits non-zero unless both runs collected tests, neither has a failure or error, and every test
that passes with PEFT's functions passes with loraswap's. Nothing of PEFT's is written into this
repository.

    python scripts/peft_hotswap_suite.py            # download, run both, print the comparison
    python scripts/peft_hotswap_suite.py --sdist peft-0.21.2.tar.gz --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

SCRIPTS = Path(__file__).resolve().parent
TEST_FILE = "tests/test_initialization.py"
TEST_CLASS = "TestHotSwapping"
IMPLEMENTATIONS = ("peft", "loraswap")


def download_sdist(version: str, directory: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"peft=={version}",
            "-d",
            str(directory),
        ],
        check=True,
    )
    archives = sorted(directory.glob("peft-*.tar.gz"))
    if not archives:
        raise SystemExit(f"pip download left no peft sdist in {directory}")
    return archives[0]


def unpack(archive: Path, directory: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(directory, filter="data")
    roots = [path for path in directory.iterdir() if (path / TEST_FILE).is_file()]
    if not roots:
        raise SystemExit(f"{archive} has no {TEST_FILE}")
    root = roots[0]
    (root / "tests" / "__init__.py").touch()  # the sdist omits it; the tests import .testing_utils
    return root


def run_suite(root: Path, implementation: str, report: Path, extra_args: list[str]) -> dict:
    """One pytest process over TestHotSwapping; outcome per test id from its JUnit XML."""
    env = dict(os.environ, LORASWAP_PEFT_IMPL=implementation)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "pytest",
        TEST_FILE,
        "-k",
        TEST_CLASS,
        "-p",
        "peft_hotswap_plugin",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "-q",
        f"--junitxml={report}",
        *extra_args,
    ]
    return run_pytest(command, root, env, report, implementation)


def run_pytest(
    command: list[str], root: Path, env: dict[str, str], report: Path, implementation: str, log: Path | None = None
) -> dict:
    """Run one pytest ``command`` in ``root``: exit code, seconds, last output line, outcomes from ``report``, log.
    With ``log``, the output is written there as it comes (a long run can be followed, and an interrupted one read)."""
    start = time.perf_counter()
    if log is None:
        completed = subprocess.run(command, check=False, cwd=root, env=env, capture_output=True, text=True)
        output = completed.stdout + completed.stderr
    else:
        with log.open("w") as stream:
            completed = subprocess.run(command, check=False, cwd=root, env=env, stdout=stream, stderr=subprocess.STDOUT)
        output = log.read_text()
    seconds = time.perf_counter() - start
    tail = output.strip().splitlines()[-1:] or [""]
    return {
        "implementation": implementation,
        "exit_code": completed.returncode,
        "seconds": round(seconds, 1),
        "summary": tail[0],
        "outcomes": read_outcomes(report) if report.exists() else {},
        "log": output,
    }

def read_outcomes(report: Path) -> dict[str, str]:
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[name] = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
    return outcomes


def counts(outcomes: dict[str, str]) -> dict[str, int]:
    return {kind: sum(1 for o in outcomes.values() if o == kind) for kind in ("passed", "failure", "error", "skipped")}


def compare(runs: dict[str, dict]) -> list[str]:
    """Every reason the comparison fails (empty when loraswap matches PEFT)."""
    problems = []
    for name, run in runs.items():
        tally = counts(run["outcomes"])
        if not run["outcomes"]:
            problems.append(f"{name}: no test ran (exit code {run['exit_code']}): {run['summary']}")
        if tally["failure"] or tally["error"]:
            problems.append(f"{name}: {tally['failure']} failed, {tally['error']} errors")
    if "peft" in runs and "loraswap" in runs:
        reference, candidate = runs["peft"]["outcomes"], runs["loraswap"]["outcomes"]
        lost = sorted(
            test for test, outcome in reference.items() if outcome == "passed" and candidate.get(test) != "passed"
        )
        problems.extend(f"passes with PEFT, not with loraswap: {test}" for test in lost)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help="a downloaded peft-VERSION.tar.gz (default: pip download it)")
    parser.add_argument("--peft-version", help="PEFT version whose tests to run (default: the installed one)")
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help="run one implementation only")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--verbose", action="store_true", help="print each run's pytest output")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    import peft

    version = args.peft_version or peft.__version__
    with tempfile.TemporaryDirectory(prefix="peft-hotswap-suite-") as temporary:
        directory = Path(temporary)
        start = time.perf_counter()
        archive = args.sdist or download_sdist(version, directory)
        download_seconds = time.perf_counter() - start
        root = unpack(archive, directory)
        implementations = [args.only] if args.only else list(IMPLEMENTATIONS)
        runs = {name: run_suite(root, name, directory / f"{name}.xml", args.pytest_args) for name in implementations}
    problems = compare(runs)
    result = {
        "peft_version": version,
        "sdist": str(args.sdist) if args.sdist else f"pip download peft=={version}",
        "download_seconds": round(download_seconds, 1),
        "runs": summarise(runs),
        "problems": problems,
    }
    heading = f"PEFT {version} {TEST_FILE}::{TEST_CLASS} (sdist download {download_seconds:.1f} s)"
    return report(result, runs, heading, [], "OK: loraswap.peft passes every test PEFT's functions pass", args)


def summarise(runs: dict[str, dict]) -> dict[str, dict]:
    """Each run's exit code, seconds, pytest summary line and outcome counts."""
    return {
        name: {key: run[key] for key in ("exit_code", "seconds", "summary")} | counts(run["outcomes"])
        for name, run in runs.items()
    }


def report(result: dict, runs: dict[str, dict], heading: str, notes: list[str], ok: str, args) -> int:
    """Print ``result`` (JSON with ``--json``, else one line per run), each run's log when verbose or failing;
    the exit code: 1 when ``result["problems"]`` is not empty."""
    problems = result["problems"]
    if args.verbose or problems:
        for name, run in runs.items():
            print(f"===== {name} =====\n{run['log']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return 1 if problems else 0
    print(heading)
    for name, run in result["runs"].items():
        print(
            f"  {name:9s} passed {run['passed']:3d}  failed {run['failure']:2d}  errors {run['error']:2d}  "
            f"skipped {run['skipped']:2d}  ({run['seconds']:.1f} s)"
        )
    for note in notes:
        print(f"  {note}")
    print(ok if not problems else "FAILED:")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0

if __name__ == "__main__":
    sys.exit(main())
