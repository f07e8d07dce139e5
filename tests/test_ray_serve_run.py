"""Ray Serve's own ways of starting an app, on one local CPU Ray cluster: ``serve run module:builder key=value``
(examples/snippets/serve_run.sh, string arguments), a Serve config file (examples/snippets/serve_config.yaml, typed
``args:``) and ``serve.run(build_openai_app(dict))`` from Python (examples/snippets/serve_dict.py). Each app answers
the official openai client, whole and streamed, with the offline engine's greedy text (examples/snippets/serve_client.py
run as the docs show it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from conftest import tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "snippets")
DOC_MODEL = "/models/qwen3-0.6b"  # the path the examples show; replaced by the tiny checkpoint here
MODEL_NAME, KEY = "my-model", "sk-local"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """One Ray instance and Serve (on a free port) for the module; the CLI and scripts join it by RAY_ADDRESS,
    and Serve's ``serve_start`` there keeps this HTTP port."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = path  # the raylet's workers inherit it: every replica imports this checkout
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MODEL": tiny("llama"),
           "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "TOKENIZERS_PARALLELISM": "false",
           "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1", "OPENAI_API_KEY": KEY}
    yield {"url": f"http://127.0.0.1:{port}", "env": env}
    serve.shutdown()
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def offline():
    from flotilla import Engine

    with Engine(model=tiny("llama"), max_num_seqs=32) as engine:
        yield engine


def _wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 240) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the command exited ({proc.returncode}): {proc.stdout.read()}")
        try:
            if [m.id for m in client.models.list().data] == [MODEL_NAME]:
                return client
        except (openai.APIError, openai.APIConnectionError):
            pass
        time.sleep(1)
    pytest.fail("the app did not answer /v1/models in time")


def _check_answers(client: openai.OpenAI, env: dict, offline) -> None:
    """Completions whole and streamed give the offline greedy text; the docs' client script agrees with itself."""
    prompt = "The capital of France is"
    want = offline.generate([prompt], {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True},
                            use_tqdm=False)[0]["text"]
    greedy = dict(max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True})
    whole = client.completions.create(model=MODEL_NAME, prompt=prompt, **greedy)
    assert whole.choices[0].text == want and whole.usage.completion_tokens == 8
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, stream=True, **greedy))
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks if c.choices) == want
    out = subprocess.run([sys.executable, os.path.join(EXAMPLES, "serve_client.py")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "") for line in out.stdout.splitlines())
    assert set(lines) == {"whole", "stream"} and lines["whole"] == lines["stream"], out.stdout


def _delete_apps() -> None:
    for name in list(serve.status().applications):
        serve.delete(name)


def test_serve_run_with_key_value_arguments(cluster, offline):
    proc = subprocess.Popen(["bash", os.path.join(EXAMPLES, "serve_run.sh")], env=cluster["env"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        client = _wait_ready(cluster["url"], proc)
        _check_answers(client, cluster["env"], offline)
        engine = serve.status().applications["default"].deployments["FlotillaEngine"]
        assert sum(engine.replica_states.values()) == 1  # num_replicas=1, read from the string "1"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # not SIGINT: serve run would shut Serve down for the next test
        proc.wait()
        _delete_apps()


def test_serve_run_with_a_config_file(cluster, offline, tmp_path):
    with open(os.path.join(EXAMPLES, "serve_config.yaml")) as f:
        text = f.read()
    assert DOC_MODEL in text
    config = tmp_path / "serve_config.yaml"
    config.write_text(text.replace(DOC_MODEL, tiny("llama")))
    out = subprocess.run(["serve", "run", "--non-blocking", str(config)], env=cluster["env"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        client = _wait_ready(cluster["url"])
        _check_answers(client, cluster["env"], offline)
        app = serve.status().applications["flotilla"]
        assert app.deployments["FlotillaEngine"].status == "HEALTHY"
    finally:
        _delete_apps()


def test_serve_run_from_python_with_a_dict(cluster, offline):
    out = subprocess.run([sys.executable, os.path.join(EXAMPLES, "serve_dict.py")], env=cluster["env"], cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        _check_answers(_wait_ready(cluster["url"]), cluster["env"], offline)
    finally:
        _delete_apps()


def test_a_bad_argument_fails_naming_the_field(cluster):
    out = subprocess.run(["serve", "run", "--non-blocking", "flotilla.integrations.ray_serve:build_openai_app",
                          f"model_source={tiny('llama')}", "num_replicas=two", "engine_kwarg={}"],
                         env=cluster["env"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "unknown field(s) ['engine_kwarg']" in out.stdout + out.stderr
