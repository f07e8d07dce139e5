"""Bad input refused at the edge (issue 29), without starting an engine: every numeric field bounded (ids in
the vocabulary, counts within int64 and the engine's limits, time-outs finite), strict HTTP types, the docs
and RL routes behind the key, cheap size checks before tokenizing, a message that cannot be encoded failing
its own request (never "replica unreachable"), ipc socket files removed with their replica, and a stopped
worker dying with its front end.

HTTP tests run in-process against ``SyntheticEngine`` (the real InputProcessor and DPController, no model).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from flotilla.frontend.detokenizer import IncrementalDetokenizer
from flotilla.frontend.inputs import MAX_CHARS_PER_TOKEN, InputProcessor, batch_inputs
from flotilla.ipc.channel import ChannelHub, EncodeError, connect
from flotilla.ipc.links import HubLinks
from flotilla.ipc.messages import AddRequest, to_worker_decoder
from flotilla.launch.topology import MAX_DP_SIZE, check_scale
from flotilla.frontend.request import RequestState
from flotilla.router.controller import DPController, ReplicaUnreachable, RequestRejected
from flotilla.router.dispatch import Dispatcher
from flotilla.sampling import SamplingParams
from flotilla.server import build_app
from flotilla.server.sampling import MAX_PROMPTS
from flotilla.server.synthetic import SyntheticEngine

pytestmark = pytest.mark.timeout(120)

BIG = 2**64
MODEL = "fake"
KEY = "sekrit"


@pytest.fixture(scope="module")
def tokenizer(llama_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_path)


@pytest.fixture(scope="module")
def inputs(tokenizer: Any) -> InputProcessor:
    return InputProcessor(tokenizer, len(tokenizer), 128)


@pytest.fixture(scope="module")
def engine(tokenizer: Any):
    eng = SyntheticEngine(tokenizer, dp_size=1, step_ms=1.0, max_model_len=128)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def client(engine: SyntheticEngine):
    with TestClient(build_app(engine, MODEL)) as tc:
        yield tc


@pytest.fixture(scope="module")
def keyed(engine: SyntheticEngine):
    with TestClient(build_app(engine, MODEL, api_key=KEY)) as tc:
        yield tc


def _err(r: Any, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return r.json()["error"]


# ============================================================================================ Python edge

@pytest.mark.parametrize("field, value", [
    ("top_k", BIG), ("top_k", 2**63), ("max_new_tokens", BIG), ("seed", BIG), ("seed", -1),
    ("stop_token_ids", [BIG]), ("stop_token_ids", [-1]), ("n", BIG), ("top_logprobs", BIG),
    ("prompt_logprobs", BIG),
])
def test_sampling_ints_beyond_int64_or_limits_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        SamplingParams(**{field: value})


def test_largest_int64_top_k_is_taken() -> None:
    assert SamplingParams(top_k=2**63 - 1).top_k == 2**63 - 1


@pytest.mark.parametrize("kwargs, field", [({"stop": 5}, "stop"), ({"stop": [5]}, "stop"),
                                           ({"stop_token_ids": 7}, "stop_token_ids"),
                                           ({"stop": ["x"] * 65}, "stop")])
def test_stop_of_the_wrong_type_is_a_value_error_naming_it(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        SamplingParams(**kwargs)


def test_out_of_vocabulary_stop_token_ids_are_refused(inputs: InputProcessor) -> None:
    vocab = inputs.vocab_size
    with pytest.raises(ValueError, match=rf"stop_token_ids: token id {vocab} is outside the vocabulary"):
        inputs.make_state("Hello", None, {"stop_token_ids": [1, vocab]})
    assert inputs.make_state("Hello", None, {"stop_token_ids": [vocab - 1]}).sampling.stop_token_ids == [vocab - 1]


@pytest.mark.parametrize("prompts", [12345, 3.5, {"a": 1}])
def test_generate_of_a_non_string_prompt_names_the_field(prompts: Any) -> None:
    with pytest.raises(ValueError, match=r"^prompts: must be a str or a list of str"):
        batch_inputs(prompts, None, None)


def test_a_non_string_prompt_in_a_list_names_the_field(inputs: InputProcessor) -> None:
    with pytest.raises(ValueError, match=r"^prompt: must be a non-empty str .*got int 12345"):
        inputs.make_state(12345, None, None)  # type: ignore[arg-type]


def test_over_long_prompt_is_blamed_on_the_prompt(inputs: InputProcessor) -> None:
    ids = [5] * 200
    with pytest.raises(ValueError, match=r"^input_ids: the prompt has 200 tokens, and max_model_len is 128"):
        inputs.make_state(None, ids, {"max_new_tokens": 1})
    # it fits, but not with that many new tokens: then max_new_tokens is at fault, with what would fit
    with pytest.raises(ValueError, match=r"^max_new_tokens: .*at most 28 new tokens fit"):
        inputs.make_state(None, [5] * 100, {"max_new_tokens": 50})


def test_huge_prompt_is_refused_before_tokenizing(tokenizer: Any) -> None:
    calls = []

    class CountingTokenizer:
        def __call__(self, text: str, **kw: Any) -> Any:
            calls.append(len(text))
            return tokenizer(text, **kw)

    proc = InputProcessor(CountingTokenizer(), len(tokenizer), 128)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"^prompt: 10000000 characters cannot fit in max_model_len 128"):
        proc.make_state("x" * 10_000_000, None, None)
    assert calls == [] and time.perf_counter() - t0 < 1.0
    with pytest.raises(ValueError, match=r"^prompt: the prompt has \d+ tokens"):
        proc.make_state("x" * 1000, None, None)  # under the bound: tokenized, then measured in tokens
    assert calls == [1000]


def test_choice_seeds_stay_within_int64(inputs: InputProcessor) -> None:
    states = inputs.make_choices("Hello", None, {"n": 3, "seed": 2**63 - 1})
    assert [s.sampling.seed for s in states] == [2**63 - 1, 0, 1]


@pytest.mark.parametrize("dp, drain", [(0, 1.0), (MAX_DP_SIZE + 1, 1.0), (True, 1.0), (2, -1.0),
                                       (2, math.nan), (2, math.inf), (2, "5")])
def test_scale_arguments_are_bounded(dp: Any, drain: Any) -> None:
    with pytest.raises(ValueError, match=r"^(dp_size|drain_timeout_s): "):
        check_scale(dp, drain)


def test_scale_is_bounded_by_what_the_launcher_holds() -> None:
    check_scale(4, 0.0, ranks_per_replica=2, max_ranks=8)
    with pytest.raises(ValueError, match=r"dp_size: must be an int in \[1, 4\] \(8 ranks fit"):
        check_scale(5, 0.0, ranks_per_replica=2, max_ranks=8)


def test_control_time_outs_are_finite_and_positive() -> None:
    from flotilla.frontend.control import check_timeout

    for bad in (0, -1, math.nan, math.inf, 10**400, "60", True, None):
        with pytest.raises(ValueError, match=r"^timeout: must be a finite number of seconds"):
            check_timeout("timeout", bad)
    assert check_timeout("timeout", 0, allow_zero=True) == 0.0 and check_timeout("timeout", 5) == 5.0


def test_weight_sync_join_bounds_its_integers_and_connect_time_out() -> None:
    from flotilla.weights.groups import WeightSyncGroups

    sync = WeightSyncGroups(port=None, fleet=None, device="cpu")  # type: ignore[arg-type]  # refused before either is touched
    with pytest.raises(ValueError, match=r"^world_size: "):
        sync.init_group("127.0.0.1", 1234, 1, BIG, backend="gloo")
    with pytest.raises(ValueError, match=r"^rank_offset: "):
        sync.init_group("127.0.0.1", 1234, BIG, 4, backend="gloo")
    with pytest.raises(ValueError, match=r"^connect_timeout_s: "):
        sync.init_group("127.0.0.1", 1234, 1, 4, backend="gloo", connect_timeout_s=math.inf)


def test_unreachable_store_fails_within_the_connect_time_out() -> None:
    import socket

    from flotilla.weights.groups import wait_reachable

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"master_address: the trainer's store at 127.0.0.1:{port} did not accept"):
        wait_reachable("127.0.0.1", port, 0.5)
    assert time.monotonic() - t0 < 3.0
    with socket.socket() as srv:  # a listening one is reached at once
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        t0 = time.monotonic()
        wait_reachable("127.0.0.1", srv.getsockname()[1], 5.0)
        assert time.monotonic() - t0 < 1.0


# ============================================================================================ encode errors

def _state(rid: str, sampling: SamplingParams, tokenizer: Any) -> RequestState:
    return RequestState(rid, [1, 2, 3], sampling, IncrementalDetokenizer(tokenizer, [1, 2, 3]))


def test_a_message_that_cannot_be_encoded_is_the_requests_error_not_the_replicas(tokenizer: Any) -> None:
    with ChannelHub() as hub:
        links = HubLinks(hub)
        send, addr = links.open(0)
        peer = connect("pull", addr, to_worker_decoder)
        try:
            deadline = time.monotonic() + 10
            while not links.writable(0) and time.monotonic() < deadline:
                time.sleep(0.01)
            ctrl = DPController("round_robin")
            disp = Dispatcher(ctrl)
            disp.replica_up(0, send)
            bad = SamplingParams()
            bad.top_k = BIG  # set after validation: only the encoder can catch it now
            state = _state("bad", bad, tokenizer)
            with pytest.raises(RequestRejected, match=r"^request: cannot be sent .*int") as info:
                disp.submit(state)
            assert not isinstance(info.value, ReplicaUnreachable) and isinstance(info.value, ValueError)
            assert state.replica == -1 and ctrl.views[0].eligible
            good = _state("good", SamplingParams(), tokenizer)
            disp.submit(good)
            assert good.replica == 0  # the replica still takes requests
            msg = peer.recv(5000)
            assert isinstance(msg, AddRequest) and msg.rid == "good"
            with pytest.raises(EncodeError):
                ctrl.send(0, AddRequest("x", [BIG], SamplingParams()))
        finally:
            peer.close()


# ============================================================================================ ipc files

def test_ipc_socket_file_goes_with_its_replica() -> None:
    with ChannelHub() as hub:
        links = HubLinks(hub)
        for replica in range(5):  # five restarts of one replica: each incarnation gets a fresh socket
            links.open(replica)
            if replica:
                links.close(replica - 1)
        files = sorted(os.listdir(hub.ipc_dir))
        assert files == ["in4.sock"], files
        links.close(4)
        assert os.listdir(hub.ipc_dir) == []


# ============================================================================================ HTTP: strict types

@pytest.mark.parametrize("body, param", [
    ({"prompt": "Hi", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "Hi", "stream": "yes"}, "stream"),
    ({"prompt": "Hi", "n": True}, "n"),
    ({"prompt": "Hi", "temperature": "0.5"}, "temperature"),
    ({"prompt": "Hi", "stop_token_ids": [True]}, "stop_token_ids"),
    ({"prompt": "Hi", "max_tokens": 4.0}, "max_tokens"),
])
def test_http_does_not_coerce_types(client: TestClient, body: dict[str, Any], param: str) -> None:
    err = _err(client.post("/v1/completions", json={"model": MODEL, **body}))
    assert err["param"] == param


def test_http_int_is_still_a_float(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, param", [
    ({"top_k": BIG}, "top_k"), ({"stop_token_ids": [BIG]}, "stop_token_ids"), ({"seed": BIG}, "seed"),
    ({"max_tokens": BIG}, "max_tokens"), ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"prompt": [BIG]}, "prompt"), ({"logprobs": BIG}, "logprobs"), ({"n": BIG}, "n"),
])
def test_http_huge_ints_are_400s_at_once(client: TestClient, body: dict[str, Any], param: str) -> None:
    t0 = time.monotonic()
    err = _err(client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **body}))
    assert err["param"] == param and time.monotonic() - t0 < 5.0


def test_http_chat_huge_top_k_is_a_400(client: TestClient) -> None:
    err = _err(client.post("/v1/chat/completions", json={"model": MODEL, "top_k": BIG, "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "Hi"}]}))
    assert err["param"] == "top_k"


def test_http_over_long_prompt_names_the_prompt_and_max_model_len(client: TestClient, tokenizer: Any) -> None:
    err = _err(client.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 300, "max_tokens": 1}))
    assert err["param"] == "prompt" and "300 tokens" in err["message"] and "max_model_len is 128" in err["message"]


def test_http_ten_megabyte_prompt_is_refused_before_tokenizing(client: TestClient) -> None:
    t0 = time.monotonic()
    err = _err(client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 10_000_000}))
    assert err["param"] == "prompt" and "before tokenizing" in err["message"]
    err = _err(client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "y" * 10_000_000}]}))
    assert err["param"] == "messages" and "before tokenizing" in err["message"]
    assert time.monotonic() - t0 < 10.0
    assert 128 * MAX_CHARS_PER_TOKEN < 10_000_000


def test_http_too_many_prompts_are_refused(client: TestClient) -> None:
    err = _err(client.post("/v1/completions", json={"model": MODEL, "prompt": ["a"] * (MAX_PROMPTS + 1)}))
    assert err["param"] == "prompt" and f"at most {MAX_PROMPTS} prompts" in err["message"]
    err = _err(client.post("/v1/completions", json={"model": MODEL, "prompt": ["a"] * 100, "n": 64}))
    assert err["param"] == "prompt" and "choices" in err["message"]


def test_http_json_body_without_content_type_gets_a_hint(client: TestClient) -> None:
    body = '{"model": "fake", "prompt": "Hi", "max_tokens": 2}'
    err = _err(client.post("/v1/completions", content=body,
                           headers={"content-type": "application/x-www-form-urlencoded"}))
    assert "Content-Type: application/json" in err["message"]
    ok = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("body", [{"dp_size": True}, {"dp_size": "2"}, {"dp_size": MAX_DP_SIZE + 1},
                                  {"dp_size": 0}, {"dp_size": 1, "drain_timeout_s": -1},
                                  {"dp_size": 1, "drain_timeout_s": 10**9}])
def test_admin_scale_is_strict_and_bounded(client: TestClient, body: dict[str, Any]) -> None:
    err = _err(client.post("/admin/scale", json=body))
    assert err["param"] in ("dp_size", "drain_timeout_s")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_admin_scale_refuses_non_finite_drain(client: TestClient, value: str) -> None:
    r = client.post("/admin/scale", content=f'{{"dp_size": 1, "drain_timeout_s": {value}}}',
                    headers={"content-type": "application/json"})
    assert _err(r)["param"] == "drain_timeout_s"


# ============================================================================================ HTTP: the key

@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"])
def test_docs_need_the_key(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 401
    assert keyed.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_rl_routes_check_the_key_before_the_body(keyed: TestClient) -> None:
    for path in ("/init_weights_update_group", "/update_weights_from_disk", "/pause_generation"):
        r = keyed.post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401, (path, r.text)
    r = keyed.post("/init_weights_update_group", content=b"{not json",
                   headers={"content-type": "application/json", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400


def test_rl_bodies_are_strict(client: TestClient) -> None:
    r = client.post("/init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": "1234",
                                                        "rank_offset": 1, "world_size": 2})
    assert r.status_code == 400 and "master_port" in r.text


# ============================================================================================ lifeline

CHILD = textwrap.dedent("""
    import sys, time
    from flotilla.worker import lifeline
    lifeline.install(int(sys.argv[1]), sys.argv[2])
    print("installed", flush=True)
    time.sleep(600)
""")

# the front end's stand-in: starts CHILD from a short-lived thread (as restarts do), prints its pid, idles
PARENT = textwrap.dedent("""
    import os, subprocess, sys, threading, time
    box = {}
    def start():
        p = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "installed"
        box["p"] = p
    t = threading.Thread(target=start)
    t.start()
    t.join()
    print(box["p"].pid, flush=True)
    time.sleep(600)
""")


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_stopped_worker_dies_with_its_front_end() -> None:
    private_dir = tempfile.mkdtemp(prefix="flotilla-edge-")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, private_dir], stdout=subprocess.PIPE, text=True,
                              env=env)
    child = int(parent.stdout.readline())
    try:
        time.sleep(1.0)  # the starting thread is gone: the child lives on
        assert not _gone(child)
        os.kill(child, signal.SIGSTOP)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 20
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child), "a stopped worker outlived its front end"
        assert not os.path.exists(private_dir)  # woken, its lifeline cleaned up as usual
    finally:
        if parent.poll() is None:
            parent.kill()
        if not _gone(child):
            os.kill(child, signal.SIGKILL)


def test_a_rank_gives_up_on_an_unreachable_store_after_its_connect_time_out() -> None:
    from flotilla.weights import broadcast as weight_sync

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"joining weight-sync group 'edge' at 127.0.0.1:{port}"):
        weight_sync.join("edge", "127.0.0.1", port, 2, 1, "gloo", timeout_s=600.0, connect_timeout_s=1.0)
    assert time.monotonic() - t0 < 15.0  # not the 600 s of the whole join
    assert "edge" not in weight_sync.joined()
