"""Streams under load on a tiny model: 200 at once each end properly and carry the non-streamed text; a client
that leaves mid-stream aborts its request in the replica; a client that stops reading holds up nobody."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx
import pytest

from flotilla.server import ServerThread, build_app

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def engine(llama_dp2_engine):
    yield llama_dp2_engine  # Engine(tiny llama, dp_size=2, cpu, float32), shared by the session (tests/conftest.py)


@pytest.fixture(scope="module")
def server(engine) -> ServerThread:
    srv = ServerThread(build_app(engine, MODEL)).start()
    yield srv
    srv.stop()


def wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def body(i: int, stream: bool) -> dict[str, Any]:
    b: dict[str, Any] = {"model": MODEL, "prompt": f"Request {i} tells a story about", "max_tokens": 4 + i % 21,
                         "temperature": 0.0, "ignore_eos": True, "stream": stream}
    if i % 5 == 0:
        b["stop"] = ["e t", "an"]  # a stop string: the streamed text is held back around it, and cut at it
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


async def read_stream(client: httpx.AsyncClient, b: dict[str, Any]) -> dict[str, Any]:
    """Every event of one stream, checked for the shape a stream must end with."""
    events: list[Any] = []
    async with client.stream("POST", "/v1/completions", json=b) as r:
        assert r.status_code == 200
        buf = ""
        async for piece in r.aiter_text():
            buf += piece
            *frames, buf = buf.split("\n\n")
            for f in frames:
                assert f.startswith("data: "), f
                events.append(f[6:])
        assert buf == ""
    assert events and events[-1] == "[DONE]", f"cut: the stream ended without [DONE] after {events[-3:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1, finishes
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] is not None  # include_usage: the last chunk
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    return {"text": text, "finish_reason": finishes[0], "completion_tokens": chunks[-1]["usage"]["completion_tokens"]}


def test_200_concurrent_streams_match_non_streamed(server: ServerThread, engine) -> None:
    n = 200

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
        # idle connections expire on the client first: uvicorn closes them after 5 s, and a request sent on one
        # the server is closing at that moment fails (a client-side race, not a cut stream)
        limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8, keepalive_expiry=1.0)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:
            probes: list[int] = []
            streams = asyncio.gather(*(read_stream(client, body(i, True)) for i in range(n)))
            task = asyncio.ensure_future(streams)
            while not task.done():  # /health and /metrics answer while every stream runs
                for path in ("/health", "/metrics"):
                    probes.append((await client.get(path, timeout=10)).status_code)
                await asyncio.sleep(0.05)
            streamed = await task
            plain = await asyncio.gather(*(client.post("/v1/completions", json=body(i, False)) for i in range(n)))
            return streamed, [p.json() for p in plain], probes

    streamed, plain, probes = asyncio.run(main())
    assert probes and all(code == 200 for code in probes), probes
    for i, (s, p) in enumerate(zip(streamed, plain)):
        choice = p["choices"][0]
        assert s["text"] == choice["text"], i
        assert s["finish_reason"] == choice["finish_reason"], i
        assert s["completion_tokens"] == p["usage"]["completion_tokens"], i
        if i % 5:
            assert s["finish_reason"] == "length" and s["completion_tokens"] == body(i, True)["max_tokens"]
    assert wait_until(lambda: engine.stats()["num_requests_inflight"] == 0)


def _aborts(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            if s.name == "flotilla_requests_total" and s.labels.get("finish_reason") == "abort":
                return s.value
    return 0.0


def test_disconnect_mid_stream_aborts_in_the_replica(server: ServerThread, engine) -> None:
    k = 6
    before = _aborts(server.url)
    long = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": engine.max_model_len - 16,
            "temperature": 0.0, "ignore_eos": True, "stream": True}

    async def leave_after_two_chunks(client: httpx.AsyncClient) -> int:
        seen = 0
        async with client.stream("POST", "/v1/completions", json=long) as r:
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 2:
                    break  # leaving the block closes the connection mid-stream
        return seen

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(leave_after_two_chunks(client) for _ in range(k)))

    assert asyncio.run(main()) == [2] * k
    # gone from the request table, and each replica was told (its own report says nothing runs there)
    assert wait_until(lambda: engine.stats()["num_requests_inflight"] == 0)
    assert not engine.dispatcher.requests
    assert wait_until(lambda: all(r["running"] == 0 for r in engine.stats()["replicas"]))
    assert wait_until(lambda: _aborts(server.url) == before + k)


def test_a_client_that_stops_reading_stalls_nobody(server: ServerThread, engine) -> None:
    host, port = server.sock.getsockname()[:2]
    slow = socket.create_connection((host, port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = json.dumps({"model": MODEL, "prompt": "Never read", "max_tokens": engine.max_model_len - 16,
                          "ignore_eos": True, "stream": True}).encode()
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    try:
        assert wait_until(lambda: engine.stats()["num_requests_inflight"] >= 1)

        async def main() -> list[dict[str, Any]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return await asyncio.gather(*(read_stream(client, body(i, True)) for i in range(1, 21)))

        results = asyncio.run(main())  # every other stream runs to its end while one client reads nothing
        assert [r["finish_reason"] for r in results if r["finish_reason"] == "length"]
    finally:
        slow.close()
    assert wait_until(lambda: engine.stats()["num_requests_inflight"] == 0)
