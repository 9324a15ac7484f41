"""``scripts/gpu_check.py`` on a machine without CUDA: one line, exit status 0 (its CUDA path runs on lent GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_without_cuda_prints_one_line_and_exits_0():
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["gpu_check: no CUDA device available, nothing to check"]
