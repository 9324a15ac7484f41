"""The README's set-up commands are what CI runs: a newcomer's first command cannot rot unnoticed."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_the_demo_and_the_test_command():
    demo, tests = _readme_commands()[:2]
    assert demo.startswith("python3 -m venv .venv") and demo.endswith("loraswap demo")
    assert tests.startswith("python3 -m venv .venv") and tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command_in_a_fresh_environment():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "rm -rf .venv" in ci
    assert _readme_commands()[1] in ci
