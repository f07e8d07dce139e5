"""The chaos soak, seeded and short (CI length), on both launchers: nothing lost, nothing duplicated, nothing
wrong, every bad input refused clearly, memory and descriptors bounded, nothing left after shutdown."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


# the mp run with overlap scheduling on (faults land while a step is in flight), the Ray run without
@pytest.mark.parametrize("launcher,seconds,overlap", [("mp", 45, True), ("ray", 30, False)])
def test_chaos_soak(launcher, seconds, overlap, tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "flotilla.tools.soak", "--launcher", launcher, "--seconds", str(seconds),
           "--seed", "1", "--fault-every-s", "2", "--json", str(out),
           "--overlap-schedule" if overlap else "--no-overlap-schedule"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 420)
    print(r.stdout[-4000:], r.stderr[-4000:])
    report = json.loads(out.read_text())
    assert report["faults_injected"] >= 2 and report["requests"] > 100
    assert report["lost"] == 0 and report["duplicated_tokens"] == 0 and report["wrong"] == 0, report["examples"]
    assert report["bad_inputs"] > 0 and report["bad_inputs_refused"] == report["bad_inputs"], report["examples"]
    assert report["completed"] > 50 and report["failed"] == 0, report["examples"]
    assert not report["leaks"]["worker_processes"] and not report["leaks"]["private_dir"]
    assert not report["leaks"].get("placement_groups")
    assert report["ok"] and r.returncode == 0
