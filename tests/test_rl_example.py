"""examples/rl_loop.py runs on a local CPU Ray cluster: a trainer actor and a RayEngine (dp=2) in one
placement group, weights broadcast over gloo each step, greedy output equal to transformers'."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("ray")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_rl_loop_example_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "rl_loop.py"), "--steps", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and all("greedy vs transformers: match" in s for s in steps), proc.stdout
    assert "weight version 2" in steps[-1] and proc.stdout.strip().endswith("ok")
