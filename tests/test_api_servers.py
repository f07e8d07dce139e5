"""``serve --api-server-count N``: several HTTP processes on one socket over the engine process
(flotilla/server/http_processes.py, engine_service.py, remote_engine.py, http_process.py).

The real engine (the session's tiny llama, dp=2) answers every route the same through two HTTP processes as through
one in-process server; the synthetic engine (no model, steps on a timer) carries the fault tests: an HTTP process
killed under load, the engine process killed, the restart budget refilling.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_cli_serve
from flotilla.errors import InvalidParameter
from flotilla.server import ServerThread, build_app
from flotilla.server.http_processes import ApiServers, check_api_server_count
from flotilla.server.synthetic import SyntheticEngine

MODEL = "tiny-llama"
KEY = "sk-procs-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


def wait_until(cond: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and not s.labels)


def sse(url: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """A streamed request's chunks, and whether it ended with [DONE]."""
    chunks, done = [], False
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    return chunks, done


def _strip(body: Any) -> Any:
    """A response without what differs per response (ids, timestamps)."""
    if isinstance(body, dict):
        return {k: _strip(v) for k, v in body.items() if k not in ("id", "created", "system_fingerprint")}
    if isinstance(body, list):
        return [_strip(v) for v in body]
    return body


def _merged(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's content: its text, log-probabilities, tool-call pieces and finish reason, however chunked."""
    text, logprobs, tools, finish = [], [], [], None
    for c in chunks:
        for ch in c.get("choices", []):
            delta = ch.get("delta", {})
            text.append(ch.get("text") or delta.get("content") or "")
            tools.extend(delta.get("tool_calls") or [])
            lp = ch.get("logprobs") or {}
            logprobs.extend(lp.get("content") or lp.get("tokens") or [])
            finish = ch.get("finish_reason") or finish
    return {"text": "".join(text), "logprobs": logprobs, "tools": _strip(tools), "finish": finish}


# ============================================================================================ the real engine


@pytest.fixture(scope="module")
def both(llama_dp2_engine, llama_path: str):
    """One in-process server and two HTTP processes, over the same engine."""
    one = ServerThread(build_app(llama_dp2_engine, MODEL, KEY)).start()
    many = ApiServers(2, tokenizer=llama_path, model_name=MODEL, api_key=KEY).start()
    many.set_engine(llama_dp2_engine)
    assert wait_until(lambda: httpx.get(f"{many.url}/health").status_code == 200)
    yield one.url, many.url, many
    many.stop()
    one.stop()


REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}),
    ("/v1/completions", {"prompt": ["Hello", "A"], "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    ("/v1/completions", {"prompt": "Once", "max_tokens": 6, "n": 2, "temperature": 1.0, "seed": 7}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 10,
                              "temperature": 0, "logprobs": True, "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Give me JSON"}], "max_tokens": 24,
                              "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "o", "schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                          "required": ["a"]}}}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 16,
                              "temperature": 0, "tool_choice": "required", "tools": [{"type": "function", "function": {
                                  "name": "get_weather", "parameters": {"type": "object", "properties": {
                                      "city": {"type": "string"}}, "required": ["city"]}}}]}),
    ("/tokenize", {"prompt": "Hello world", "return_token_strs": True}),
    ("/detokenize", {"tokens": [1, 2, 3]}),
]


@pytest.mark.parametrize("path,body", REQUESTS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(REQUESTS)])
def test_every_route_answers_as_one_process_does(both, path: str, body: dict[str, Any]) -> None:
    one, many, _ = both
    body = {"model": MODEL, **body} if path.startswith("/v1") else body
    a = httpx.post(one + path, json=body, headers=AUTH, timeout=60)
    b = httpx.post(many + path, json=body, headers=AUTH, timeout=60)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert _strip(b.json()) == _strip(a.json())
    if path.startswith("/v1") and "n" not in body and isinstance(body.get("prompt", ""), str):
        chunks_a, done_a = sse(one + path, {**body, "stream": True})
        chunks_b, done_b = sse(many + path, {**body, "stream": True})
        assert done_a and done_b and _merged(chunks_b) == _merged(chunks_a)  # chunk boundaries follow timing


def test_errors_models_and_health_answer_as_one_process_does(both) -> None:
    one, many, _ = both
    for url in (one, many):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": -1}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        r = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}, headers=AUTH)
        assert r.status_code == 404
        assert httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
    assert _strip(httpx.get(f"{many}/v1/models", headers=AUTH).json()) == \
        _strip(httpx.get(f"{one}/v1/models", headers=AUTH).json())
    h = httpx.get(f"{many}/health").json()
    assert h["status"] == "ok" and len(h["replicas"]) == 2


def test_metrics_are_summed_over_the_processes(both) -> None:
    _, many, servers = both
    before = metric(many, "flotilla_generation_tokens_total")
    n = 8
    for _ in range(n):  # a fresh connection each: the kernel spreads them over both processes
        with httpx.Client(headers=AUTH, timeout=60) as c:
            r = c.post(f"{many}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 5,
                                                         "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200
    # whichever process answers the scrape, it reports every process's tokens
    for _ in range(4):
        with httpx.Client() as c:
            text = c.get(f"{many}/metrics").text
        total = sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                    if s.name == "flotilla_generation_tokens_total")
        assert total - before == n * 5
    assert len(list(Path(servers.processes.metrics_dir).glob("*.db"))) >= 2  # both processes wrote their own


# ============================================================================================ the synthetic engine


@pytest.fixture(scope="module")
def synthetic(llama_path: str):
    """A synthetic engine (20 ms a step) behind two HTTP processes whose restart budget is one per 4 s."""
    from transformers import AutoTokenizer

    eng = SyntheticEngine(AutoTokenizer.from_pretrained(llama_path), step_ms=20, max_model_len=512)
    servers = ApiServers(2, tokenizer=llama_path, model_name=MODEL, api_key=KEY, max_restarts=1,
                         restart_window_s=4.0).start()
    servers.set_engine(eng)
    assert wait_until(lambda: httpx.get(f"{servers.url}/health").status_code == 200)
    yield eng, servers
    servers.stop()
    eng.shutdown()


def test_control_routes_and_tensors_cross_to_the_engine_process(synthetic, tmp_path: Path) -> None:
    from flotilla.rl.weight_sync import encode_tensors

    synthetic, servers = synthetic
    url = servers.url
    folder = tmp_path / "sql"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA",
                                                            "target_modules": ["q_proj"]}))
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(folder)}, headers=AUTH)
    assert r.status_code == 200, r.text
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]]
    assert ids == [MODEL, "sql"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "sql", "prompt": "x", "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 200 and synthetic.lora_requests[-1][1] == "sql"
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    body = {"lora_name": "sql", "serialized_named_tensors": [encode_tensors([(name, torch.ones(8, 8))])]}
    r = httpx.post(f"{url}/update_lora_weights", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    assert synthetic.last_lora_update == ("sql", [name])  # the tensor crossed as a tensor
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(folder)}, headers=AUTH)
    assert r.status_code == 400 and "already loaded" in r.text  # the engine's error, named, through the call
    r = httpx.post(f"{url}/admin/scale", json={"dp_size": 2}, headers=AUTH)
    assert r.status_code == 400 and "dp_size" in r.text
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=AUTH)
    assert r.status_code == 200 and synthetic.list_lora_adapters() == []


def _stream_outcome(url: str, body: dict[str, Any], out: list[str]) -> None:
    try:
        chunks, done = sse(url, body)
        errored = any("error" in c for c in chunks)
        out.append("done" if done and not errored else "error" if errored else "cut")
    except (httpx.HTTPError, AssertionError):
        out.append("cut")


def test_a_killed_http_process_is_restarted_and_the_others_keep_serving(synthetic) -> None:
    _, servers = synthetic
    url = servers.url
    pids = servers.processes.pids()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 100, "stream": True}  # ~2 s at 20 ms a step
    outcomes: list[str] = []
    threads = [threading.Thread(target=_stream_outcome, args=(f"{url}/v1/completions", body, outcomes))
               for _ in range(8)]
    for t in threads:
        t.start()
    assert wait_until(lambda: servers.service.streams() == 8)
    os.kill(pids[0], signal.SIGKILL)
    for t in threads:
        t.join(30)
    assert len(outcomes) == 8 and set(outcomes) <= {"done", "cut"}, outcomes
    assert "done" in outcomes  # the other process's streams ran to the end
    assert wait_until(lambda: servers.service.streams() == 0)  # the dead process's streams were aborted
    assert wait_until(lambda: servers.processes.pids()[0] not in (None, pids[0]))  # restarted
    assert servers.processes.pids()[1] == pids[1]
    assert wait_until(lambda: servers.service.connected() == 2)
    for _ in range(4):
        with httpx.Client(headers=AUTH, timeout=30) as c:
            assert c.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}
                          ).status_code == 200
    # a second death within the window: the budget (1) is spent, the slot stays down until it refills
    pid = servers.processes.pids()[0]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: servers.processes.slots[0].given_up, 10)
    assert wait_until(lambda: servers.processes.pids()[0] is not None, 20)  # refilled after the window
    assert not servers.processes.slots[0].given_up
    assert wait_until(lambda: servers.service.connected() == 2)
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE


ENGINE_PROCESS = textwrap.dedent("""
    import json, sys, time
    from transformers import AutoTokenizer
    from flotilla.server.http_processes import ApiServers
    from flotilla.server.synthetic import SyntheticEngine
    path = sys.argv[1]
    engine = SyntheticEngine(AutoTokenizer.from_pretrained(path), step_ms=20)
    servers = ApiServers(2, tokenizer=path, model_name="m").start()
    servers.set_engine(engine)
    print(json.dumps({"url": servers.url, "pids": servers.processes.pids()}), flush=True)
    time.sleep(600)
""")


def test_the_engine_process_killed_ends_every_http_process(llama_path: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", ENGINE_PROCESS, llama_path], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        url, pids = info["url"], info["pids"]
        assert wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)
        outcomes: list[str] = []
        t = threading.Thread(target=_stream_outcome, args=(f"{url}/v1/completions",
                                                           {"model": "m", "prompt": "x", "max_tokens": 400,
                                                            "stream": True}, outcomes))
        t.start()
        time.sleep(0.5)
        proc.kill()
        proc.wait(10)
        t.join(30)
        assert outcomes in (["error"], ["cut"])  # the stream ended, with an error event or a cut connection
        codes = []
        for _ in range(3):  # until they exit, the HTTP processes answer 503 (or refuse the connection)
            try:
                codes.append(httpx.get(f"{url}/health", timeout=2).status_code)
            except httpx.HTTPError:
                codes.append(0)
        assert set(codes) <= {503, 0}, codes
        assert wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                          for p in pids), 30), "an HTTP process outlived the engine process"
    finally:
        if proc.poll() is None:
            proc.kill()


# ============================================================================================ edges


@pytest.mark.parametrize("n", [0, -1, 65, True, 1.5, "2"])
def test_a_bad_api_server_count_names_the_field(n: Any) -> None:
    with pytest.raises(InvalidParameter, match=r"api_server_count: must be an integer in \[1, 64\]"):
        check_api_server_count(n)


def test_serve_refuses_a_bad_count_before_starting_anything(llama_path: str, capsys: pytest.CaptureFixture) -> None:
    from flotilla.cli import main

    assert main(["serve", "--model", llama_path, "--api-server-count", "0", "--port", "0"]) == 2
    assert "api_server_count: must be an integer in [1, 64]" in capsys.readouterr().err


def test_the_count_comes_from_the_config_file_too(llama_path: str, tmp_path: Path) -> None:
    from flotilla.cli import parse_args

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model: {llama_path}\napi_server_count: 3\n")
    args, _ = parse_args(["serve", "--config", str(cfg)])
    assert args.api_server_count == 3
    args, _ = parse_args(["serve", "--config", str(cfg), "--api-server-count", "2"])
    assert args.api_server_count == 2  # the command line wins


def test_http_processes_that_cannot_start_fail_the_start_at_once(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"HTTP process\(es\) \[0\] kept exiting at start"):
        ApiServers(1, tokenizer=str(tmp_path / "no-such-tokenizer"), model_name=MODEL, max_restarts=1).start(
            timeout=300)
    assert time.monotonic() - t0 < 120  # not the 300 s timeout


def test_cli_serve_with_two_http_processes(llama_path: str) -> None:
    """``flotilla serve --api-server-count 2``: the key reaches every process, both serve, SIGTERM ends all of them
    (HTTP processes and rank workers) with exit status 0."""
    proc, url = start_cli_serve(llama_path, "--api-server-count", "2")
    try:
        assert url, "no 'serving' line"
        assert wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)
        for _ in range(4):  # fresh connections: both processes answer
            with httpx.Client(timeout=60) as c:
                r = c.post(f"{url}/v1/completions", json={"model": "cli-model", "prompt": "Hi", "max_tokens": 3,
                                                          "ignore_eos": True},
                           headers={"Authorization": "Bearer cli-key"})
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
                assert c.post(f"{url}/v1/completions", json={"model": "cli-model", "prompt": "x"}).status_code == 401
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # two HTTP processes and the rank worker(s)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"left running: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
