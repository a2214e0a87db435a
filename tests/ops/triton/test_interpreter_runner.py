"""Runs the Triton kernel tests in a child process under TRITON_INTERPRET=1 when this process has no GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
MODULES = [
    "test_common.py",
    "test_cross_entropy.py",
    "test_linear_cross_entropy.py",
    "test_logprobs.py",
    "test_distillation.py",
]

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="this process launches the kernels itself (CUDA, or TRITON_INTERPRET=1 from the start)",
)


def test_kernel_tests_pass_under_interpreter():
    """Every kernel test of these modules passes in Triton's CPU interpreter (some ran: not all skipped).

    One child process for all modules: starting torch and triton is a good part of the cost."""
    env_before = dict(os.environ)
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", *(str(HERE / m) for m in MODULES), "-q", "-p", "no:cacheprovider", "-rs"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"[1-9]\d* passed", summary), report
    assert dict(os.environ) == env_before  # the interpreter switch stayed in the child
