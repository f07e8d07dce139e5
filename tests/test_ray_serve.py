"""Ray Serve on a local CPU Ray cluster: the official openai client (stream and not) through Serve's proxy gives
the offline engine's greedy text; engine errors keep their HTTP meaning across the handle; prefix affinity sends
a shared prefix to one replica (its prefix cache hits every time); a killed replica's streams fail with an error
event while the other replica's finish, and Serve brings a new replica up."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from conftest import tiny  # noqa: E402
from flotilla.integrations.ray_serve import (FlotillaServeConfig, PrefixAffinityRouter, build_openai_app,  # noqa: E402
                                             prefix_key, rendezvous_order, translate_error)
from flotilla.frontend.request import RequestFailed  # noqa: E402

APP = "flotilla"
KEY = "sk-serve-test"
MODEL = "tiny-llama"
OPTS = dict(device="cpu", dtype="float32", kv_cache_tokens=8192, max_num_seqs=32)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = FlotillaServeConfig(model_source=tiny("llama"), engine_kwargs=OPTS, served_model_name=MODEL,
                                 api_key=KEY, num_replicas=2, prefix_affinity=True, affinity_prefix_tokens=32,
                                 ingress_options={"ray_actor_options": {"num_cpus": 0.5}})
    serve.run(build_openai_app(config), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(app_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline():
    from flotilla import Engine

    with Engine(model=tiny("llama"), **OPTS) as engine:
        yield engine


def _greedy(n: int) -> dict:
    return dict(max_tokens=n, temperature=0.0, extra_body={"ignore_eos": True})


def test_completions_stream_and_not_match_offline_greedy(client, offline):
    prompt = "The capital of France is"
    want = offline.generate([prompt], {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True},
                            use_tqdm=False)[0]
    done = client.completions.create(model=MODEL, prompt=prompt, **_greedy(12))
    assert done.choices[0].text == want["text"]
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == want["prompt_tokens"]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, stream=True, **_greedy(12)))
    assert len(chunks) > 1  # it streamed through the proxy, not one buffered body
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want["text"]


def test_chat_stream_and_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                            stream=True, stream_options={"include_usage": True}, **_greedy(8))
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 8 and text
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], **_greedy(8))
    assert full.choices[0].message.content == text


def test_errors_keep_their_meaning_across_the_handle(client, app_url):
    with pytest.raises(openai.BadRequestError, match="temperature"):  # the engine's ValueError, a 400 naming it
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=-1.0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="Hi", max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{app_url}/v1", api_key="nope", max_retries=0).models.list()
    import httpx

    r = httpx.post(f"{app_url}/admin/scale", json={"dp_size": 3}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "num_replicas" in r.text  # Serve owns the replica count
    assert httpx.get(f"{app_url}/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_prefix_affinity_hits_the_prefix_cache_every_time(client):
    shared = [7 + (i * 13) % 400 for i in range(48)]  # three 16-token blocks; the key is the first 32 tokens
    cached = []
    for tail in range(6):
        out = client.completions.create(model=MODEL, prompt=shared + [450 + tail, 3, 4], **_greedy(2))
        cached.append(out.usage.prompt_tokens_details.cached_tokens)
    # with two replicas and no affinity, all five repeats landing on the first one's replica is a 1-in-32 chance
    assert cached[0] == 0 and all(c >= 32 for c in cached[1:]), cached


def _engine_replicas() -> dict[str, str]:
    """unique id -> actor name of every live FlotillaEngine replica."""
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if name.startswith("SERVE_REPLICA::") and f"#{'FlotillaEngine'}#" in name:
            out[name.rsplit("#", 1)[1]] = name
    return out


def _running_engine_replicas() -> int:
    status = serve.status().applications[APP].deployments["FlotillaEngine"]
    return status.replica_states.get("RUNNING", 0)


def test_killed_replica_streams_fail_others_finish_and_serve_restarts_it(client):
    replicas = _engine_replicas()
    assert len(replicas) == 2
    ids = sorted(replicas)
    victim = ids[0]
    # prompts whose prefix the router sends to each replica (the order the router computes)
    by_replica: dict[str, list[list[int]]] = {i: [] for i in ids}
    for j in range(64):
        prompt = [5 + j] * 40
        first = ids[rendezvous_order(prefix_key(prompt, 32, 16), ids)[0]]
        if len(by_replica[first]) < 2:
            by_replica[first].append(prompt)
    assert all(len(v) == 2 for v in by_replica.values())

    results: dict[int, object] = {}
    started = threading.Barrier(5)

    def consume(k: int, prompt: list[int], n: int) -> None:
        try:
            stream = client.completions.create(model=MODEL, prompt=prompt, stream=True, **_greedy(n))
            got = 0
            first = True
            for chunk in stream:
                got += len(chunk.choices[0].text) if chunk.choices else 0
                if first:
                    first = False
                    started.wait(timeout=60)
            results[k] = ("done", got)
        except Exception as e:  # noqa: BLE001 - recorded and asserted on below
            results[k] = ("error", e)

    jobs = [(0, by_replica[victim][0], 900), (1, by_replica[victim][1], 900)]
    other = ids[1]
    jobs += [(2, by_replica[other][0], 200), (3, by_replica[other][1], 200)]
    threads = [threading.Thread(target=consume, args=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    started.wait(timeout=60)  # every stream has its first chunk: all four are in flight
    ray.kill(ray.get_actor(replicas[victim], namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a stream hung after its replica was killed"
    for k in (0, 1):  # in flight on the killed replica: the stream ends with an error event, never hangs
        kind, err = results[k]
        assert kind == "error" and isinstance(err, openai.APIError), results[k]
    for k in (2, 3):  # on the other replica: unaffected
        assert results[k][0] == "done", results[k]

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = _engine_replicas()
        if victim not in now and len(now) == 2 and _running_engine_replicas() == 2:
            break
        time.sleep(1)
    else:
        pytest.fail(f"Serve did not replace the killed replica: {_engine_replicas()}")
    for prompt in by_replica[victim]:  # the new replica now owns the victim's keys, and answers
        out = client.completions.create(model=MODEL, prompt=prompt, **_greedy(4))
        assert out.usage.completion_tokens == 4
    # the ranks sit in their replica's own (Serve-made) group, so the dead replica left none behind: one group per
    # live replica, none made by an engine
    groups = [p for p in ray.util.placement_group_table().values() if p["state"] != "REMOVED"]
    assert len(groups) == 2 and not any(p["name"].startswith("flotilla-") for p in groups), groups


# ---------------------------------------------------------------------------------------------- no cluster needed
@pytest.mark.parametrize("kwargs, field", [
    (dict(model_source=""), "model_source"),
    (dict(engine_kwargs={"tp_sise": 2}), "engine_kwargs"),
    (dict(served_model_name=""), "served_model_name"),
    (dict(api_key=3), "api_key"),
    (dict(num_replicas=0), "num_replicas"),
    (dict(num_replicas=2, autoscaling_config={"min_replicas": 1}), "num_replicas"),
    (dict(autoscaling_config=[1, 2]), "autoscaling_config"),
    (dict(max_ongoing_requests=0), "max_ongoing_requests"),
    (dict(affinity_prefix_tokens=-1), "affinity_prefix_tokens"),
    (dict(affinity_imbalance=1.5), "affinity_imbalance"),
    (dict(ingress_replicas=0), "ingress_replicas"),
    (dict(launcher="k8s"), "launcher"),
    (dict(engine_options=None), "engine_options"),
    (dict(prefix_affinity="yes"), "prefix_affinity"),
    (dict(accelerator_type=""), "accelerator_type"),
])
def test_config_is_validated_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FlotillaServeConfig(**{"model_source": "/m", **kwargs})


def test_deployment_options():
    cfg = FlotillaServeConfig(model_source="/m", engine_kwargs={"tp_size": 2, "dp_size": 2},
                              autoscaling_config={"min_replicas": 1, "max_replicas": 4}, prefix_affinity=True)
    opts = cfg.engine_deployment_options(on_gpu=True)
    assert "num_replicas" not in opts and opts["autoscaling_config"]["max_replicas"] == 4
    assert opts["placement_group_bundles"] == [{"CPU": 1}] + [{"CPU": 1, "GPU": 1}] * 4
    assert opts["max_ongoing_requests"] == 4 * 256 * 2
    router = opts["request_router_config"]
    assert router["request_router_class"] is PrefixAffinityRouter and router["request_router_kwargs"]["block_size"] == 16
    mp = FlotillaServeConfig(model_source="/m", engine_kwargs={"tp_size": 2}, launcher="mp", num_replicas=3,
                             engine_options={"health_check_period_s": 5})
    opts = mp.engine_deployment_options(on_gpu=True)
    assert opts["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 2} and "placement_group_bundles" not in opts
    assert opts["num_replicas"] == 3 and opts["health_check_period_s"] == 5 and "request_router_config" not in opts
    typed = FlotillaServeConfig(model_source="/m", accelerator_type="H100", engine_kwargs={"tp_size": 2})
    assert typed.engine_deployment_options(on_gpu=True)["placement_group_bundles"][1:] == \
        [{"CPU": 1, "GPU": 1, "accelerator_type:H100": 0.001}] * 2
    mp_typed = FlotillaServeConfig(model_source="/m", accelerator_type="A10G", launcher="mp")
    assert mp_typed.engine_deployment_options(on_gpu=True)["ray_actor_options"]["accelerator_type"] == "A10G"
    with pytest.raises(ValueError, match="config"):
        build_openai_app("/m")
    # "auto" is decided where the cluster is known: inside a replica, CUDA is hidden
    assert FlotillaServeConfig(model_source="/m").resolved(True).engine_kwargs == {"device": "cuda"}
    assert FlotillaServeConfig(model_source="/m", engine_kwargs={"device": "cpu"}).resolved(True).engine_kwargs == \
        {"device": "cpu"}


def test_prefix_key_and_rendezvous_order():
    assert prefix_key([1] * 16, 256, 16) is None  # one block, but its last token is the prompt's last: nothing cached
    assert prefix_key(None, 256, 16) is None
    assert prefix_key(list(range(40)), 256, 16) == prefix_key(list(range(32)) + [99] * 8, 256, 16)
    assert prefix_key(list(range(600)), 256, 16) == prefix_key(list(range(256)) + [1] * 344, 256, 16)
    assert prefix_key(list(range(40)), 256, 16) != prefix_key([5] + list(range(1, 40)), 256, 16)
    ids = ["a", "b", "c", "d"]
    keys = [prefix_key([k] * 40, 32, 16) for k in range(200)]
    firsts = [ids[rendezvous_order(k, ids)[0]] for k in keys]
    assert all(firsts.count(r) > 20 for r in ids)  # spread over every replica
    # a replica leaving moves only its own keys
    after = [[i for i in ids if i != "b"][rendezvous_order(k, [i for i in ids if i != "b"])[0]] for k in keys]
    assert all(a == f for a, f in zip(after, firsts) if f != "b")
    assert sorted(rendezvous_order(keys[0], ids)) == [0, 1, 2, 3]


def test_translate_error():
    from ray.exceptions import ActorDiedError, RayTaskError

    bad = RayTaskError("stream", "traceback text", ValueError("temperature: must be >= 0"))
    assert type(translate_error(bad)) is ValueError and str(translate_error(bad)) == "temperature: must be >= 0"
    failed = RayTaskError("stream", "tb", RequestFailed("no replica"))
    assert isinstance(translate_error(failed), RequestFailed)
    assert isinstance(translate_error(ActorDiedError()), RequestFailed)
    other = KeyError("x")
    assert translate_error(other) is other


class _FakeGen:
    """A DeploymentResponseGenerator stand-in: yields ``deltas``, then raises ``error`` if given."""

    def __init__(self, deltas, error=None):
        self.deltas, self.error, self.cancelled = list(deltas), error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.deltas:
            return self.deltas.pop(0)
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class _FakeHandle:
    def __init__(self, gen, stats=None):
        self.gen, self.calls, self._stats = gen, [], stats
        self.stats = self

    def options(self, **kwargs):
        return self

    def remote(self, *args):
        self.calls.append(args)
        if self._stats is not None:
            async def answer():
                if isinstance(self._stats, Exception):
                    raise self._stats
                return self._stats
            return answer()
        return self.gen


def test_client_aborts_on_close_and_translates_stream_errors():
    import asyncio

    from ray.exceptions import RayTaskError

    from flotilla.integrations.ray_serve import ServeEngineClient

    async def first_then_close(client):
        agen = client.stream_async(None, {"max_new_tokens": 9}, input_ids=[1, 2, 3], request_id="r1")
        first = await agen.__anext__()
        await agen.aclose()  # the HTTP client left: the server closes the stream
        return first

    gen = _FakeGen([{"finished": False, "token_ids": [5]}, {"finished": False, "token_ids": [6]}])
    handle = _FakeHandle(gen)
    client = ServeEngineClient(handle, tokenizer=None, max_model_len=64)
    assert asyncio.run(first_then_close(client))["token_ids"] == [5]
    assert gen.cancelled  # Serve cancels the call in the replica, whose generator then aborts the engine request
    assert handle.calls == [([1, 2, 3], {"max_new_tokens": 9}, "r1", None)]  # input_ids first: the router reads it

    async def drain(client):
        return [d async for d in client.stream_async(input_ids=[1])]

    done = _FakeGen([{"finished": True, "token_ids": [], "result": {}}])
    assert len(asyncio.run(drain(ServeEngineClient(_FakeHandle(done), None, 64)))) == 1 and not done.cancelled
    bad = _FakeGen([], RayTaskError("stream", "tb", ValueError("temperature: must be >= 0")))
    with pytest.raises(ValueError, match="^temperature: must be >= 0$"):
        asyncio.run(drain(ServeEngineClient(_FakeHandle(bad), None, 64)))
    assert bad.cancelled  # it never finished

    with pytest.raises(RuntimeError, match="no engine replica"):
        client.stats()  # /health says 503 until a replica answered
    with pytest.raises(ValueError, match="num_replicas"):
        client.scale(3)
    polled = ServeEngineClient(_FakeHandle(None, stats={"replicas": [{"id": 0, "alive": True}]}), None, 64)
    asyncio.run(polled.refresh_stats())
    assert polled.stats()["replicas"][0]["alive"]
    failing = ServeEngineClient(_FakeHandle(None, stats=RuntimeError("replica restarting")), None, 64)
    asyncio.run(failing.refresh_stats())
    with pytest.raises(RuntimeError):
        failing.stats()


def test_config_from_a_dict_of_fields_as_serve_hands_it_over():
    # serve run's key=value arguments are strings; each is read as its field's type
    cfg = FlotillaServeConfig.from_args({"model_source": "/m", "num_replicas": "2", "prefix_affinity": "true",
                                         "engine_kwargs": '{"device": "cpu", "tp_size": 2}', "gpus_per_rank": "0.5",
                                         "api_key": "123", "affinity_imbalance": "8"})
    assert (cfg.num_replicas, cfg.prefix_affinity, cfg.gpus_per_rank, cfg.api_key, cfg.affinity_imbalance) == \
        (2, True, 0.5, "123", 8)
    assert cfg.engine_kwargs == {"device": "cpu", "tp_size": 2} and cfg.ranks == 2
    auto = FlotillaServeConfig.from_args({"model_source": "/m", "num_replicas": "auto", "max_ongoing_requests": "none",
                                          "autoscaling_config": '{"min_replicas": 1, "max_replicas": 3}'})
    assert auto.num_replicas == "auto" and auto.autoscaling_config["max_replicas"] == 3
    assert auto.max_ongoing_requests == 4 * 256  # None: the default
    typed = {"model_source": "/m", "engine_kwargs": {"dp_size": 2}, "num_replicas": 3}  # a config file's args
    assert FlotillaServeConfig.from_args(typed).engine_kwargs == {"dp_size": 2}
    assert type(build_openai_app(typed)).__name__ == "Application"


@pytest.mark.parametrize("args, message", [
    ({"model_source": "/m", "num_replica": 2, "engine_kwarg": {}}, r"unknown field\(s\) \['engine_kwarg', 'num_replica'\]"),
    ({"num_replicas": 2}, "model_source"),
    ({"model_source": "/m", "num_replicas": "two"}, "num_replicas"),
    ({"model_source": "/m", "engine_kwargs": "{device: cpu}"}, "engine_kwargs: must be JSON"),
    ({"model_source": "/m", "engine_kwargs": "[1]"}, "engine_kwargs: must be a JSON dict"),
    ({"model_source": "/m", "engine_kwargs": '{"tp_sise": 2}'}, "engine_kwargs"),
    ({"model_source": "/m", "prefix_affinity": "maybe"}, "prefix_affinity: must be true or false"),
    ({"model_source": "/m", "ingress_replicas": "1.5"}, "ingress_replicas: must be an int"),
    ({"model_source": "/m", "gpus_per_rank": "half"}, "gpus_per_rank: must be a number"),
])
def test_dict_config_errors_name_the_field(args, message):
    with pytest.raises(ValueError, match=message):
        build_openai_app(args)
