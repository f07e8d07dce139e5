"""examples/batch_ray_data.py as a Ray job: ``ray job submit --working-dir . -- python examples/batch_ray_data.py``
against a local CPU Ray cluster (with its job server) over examples/snippets/prompts.jsonl. The JSONL results keep
every input column (id, nested metadata), the answers are the offline engine's greedy text, and the job prints
its tokens/s at the end."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("ray.dashboard.modules.job")  # ray job submit needs the dashboard's job server

from conftest import tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(ROOT, "examples", "snippets", "prompts.jsonl")
MAX_TOKENS = 8
DOC_MODEL, DOC_OUTPUT = "/models/qwen3-0.6b", "/tmp/answers"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _doc_command(port: int, out_dir) -> list[str]:
    """examples/snippets/ray_job_submit.sh (the command docs/ray.md shows) against this cluster: its address
    added, ``python`` spelled as this interpreter (the job's PATH may hold another), the tiny checkpoint for the
    model, a temporary output folder, and few tokens."""
    with open(os.path.join(ROOT, "examples", "snippets", "ray_job_submit.sh")) as f:
        text = " ".join(line for line in f.read().replace("\\\n", " ").splitlines() if not line.startswith("#"))
    cmd = shlex.split(text)
    assert cmd[:3] == ["ray", "job", "submit"] and cmd.count(DOC_MODEL) == 1 and cmd.count(DOC_OUTPUT) == 1
    swap = {"python": sys.executable, DOC_MODEL: tiny("llama"), DOC_OUTPUT: str(out_dir)}
    cmd = [swap.get(t, t) for t in cmd]
    return cmd[:3] + ["--address", f"http://127.0.0.1:{port}"] + cmd[3:] + [
        "--max-tokens", str(MAX_TOKENS), "--engine-kwargs", json.dumps({"max_num_seqs": 16})]


def test_ray_job_submit_writes_results_and_tokens_per_s(tmp_path):
    port = _free_port()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, old) if p)  # the job's driver and workers
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             log_to_driver=False)
    try:
        out_dir = tmp_path / "answers"
        cmd = _doc_command(port, out_dir)
        env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        log = done.stdout + done.stderr
        print(log)  # shown with -s or on failure: the job's logs, progress bar included
        assert done.returncode == 0, f"{shlex.join(cmd)}\n{log}"
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    with open(PROMPTS) as f:
        inputs = {row["id"]: row for row in map(json.loads, f)}
    rows = [json.loads(line) for path in sorted(glob.glob(str(out_dir / "*.json*"))) for line in open(path)]
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == len(inputs) and sorted(by_id) == sorted(inputs)

    from flotilla import Engine

    with Engine(model=tiny("llama"), max_num_seqs=16) as engine:
        want = engine.generate([inputs[i]["prompt"] for i in sorted(inputs)],
                               {"max_new_tokens": MAX_TOKENS, "temperature": 0.0}, use_tqdm=False)
    for i, w in zip(sorted(inputs), want):
        got = by_id[i]
        assert got["metadata"] == inputs[i]["metadata"] and got["prompt"] == inputs[i]["prompt"]
        assert got["generated_text"] == w["text"] and got["num_generated_tokens"] == w["completion_tokens"]
        assert "sampling_params" not in got and "generated_token_ids" not in got
    total = sum(w["completion_tokens"] for w in want)
    m = re.search(r"(\d+) rows, (\d+) output tokens in [\d.]+s: ([\d.]+) tokens/s", log)
    assert m, log
    assert (int(m.group(1)), int(m.group(2))) == (len(inputs), total) and float(m.group(3)) > 0
    assert "succeeded" in log.lower()
    assert "Running Dataset" in log  # Ray Data's progress (its logging form when the output is not a terminal)
