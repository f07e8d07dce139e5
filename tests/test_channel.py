"""flotilla.ipc.channel: round trips over ipc and CURVE tcp, and that nothing unauthenticated gets through.

Every wait has a timeout, so a broken channel fails a test instead of hanging it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import stat
import threading
import time

import psutil
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from flotilla.ipc.channel import ChannelHub, CurveKeys, SendTimeout, connect
from flotilla.ipc.messages import (AbortRequest, AddRequest, ReplicaLoad, Shutdown, StepOutput, TokenOutput,
                                   WorkerReady, encoder, from_worker_decoder, to_worker_decoder)
from flotilla.sampling import SamplingParams

pytestmark = pytest.mark.timeout(20)

REJECT_WAIT_MS = 1500


def _add(rid: str = "r0") -> AddRequest:
    return AddRequest(rid=rid, prompt_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=4, temperature=0.0))


def _step(rid: str, replica: int = 0) -> StepOutput:
    return StepOutput(replica=replica,
                      outputs=[TokenOutput(rid=rid, token_ids=[7, 8], finished=True, finish_reason="length",
                                           logprobs=[-0.5, -0.25], top_logprobs=[[(7, -0.5)], [(8, -0.25)]])],
                      load=ReplicaLoad(running=1, kv_total_tokens=1024))


def _echo_worker(req_addr: str, out_addr: str, keys: CurveKeys | None, replica: int) -> None:
    """A stand-in for replica rank 0 (runs in a spawned process): answer each AddRequest with a
    StepOutput for the same rid until Shutdown."""
    reqs = connect("pull", req_addr, to_worker_decoder, keys)
    outs = connect("push", out_addr, None, keys)
    try:
        outs.send(WorkerReady(replica=replica, rank=0, pid=os.getpid(), num_kv_blocks=8, block_size=16,
                              max_model_len=128))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            msg = reqs.recv(timeout_ms=200)
            if msg is None:
                continue
            if isinstance(msg, Shutdown):
                break
            assert isinstance(msg, AddRequest), msg
            outs.send(_step(msg.rid, replica))
    finally:
        reqs.close()
        outs.close()


def _round_trip_with_process(hub: ChannelHub, keys_for_worker: CurveKeys | None) -> None:
    req, req_addr = hub.bind("push", "requests-0")
    out, out_addr = hub.bind("pull", "outputs", from_worker_decoder)
    proc = mp.get_context("spawn").Process(target=_echo_worker, args=(req_addr, out_addr, keys_for_worker, 0),
                                           daemon=True)
    proc.start()
    try:
        ready = out.recv(timeout_ms=15_000)
        assert isinstance(ready, WorkerReady) and ready.pid == proc.pid
        sent = [_add(f"r{i}") for i in range(5)]
        for m in sent:
            req.send(m)
        got: list[StepOutput] = []
        deadline = time.monotonic() + 10
        while len(got) < len(sent) and time.monotonic() < deadline:
            got.extend(out.recv_many(timeout_ms=500))
        assert [g.outputs[0].rid for g in got] == [m.rid for m in sent]
        assert got[0] == _step("r0")
        req.send(Shutdown())
        proc.join(10)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)


class _HandshakeWatch:
    """Counts a bound socket's handshake outcomes (zmq socket monitor), so tests can wait until a rogue
    peer has actually been turned away instead of sleeping and hoping."""

    EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL |
              zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.mon = sock.get_monitor_socket(self.EVENTS)
        self.counts = {zmq.EVENT_HANDSHAKE_SUCCEEDED: 0, zmq.EVENT_HANDSHAKE_FAILED_AUTH: 0,
                       zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: 0, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: 0}

    def wait(self, done, timeout_s: float = 5.0) -> dict[int, int]:
        deadline = time.monotonic() + timeout_s
        while not done(self.counts) and time.monotonic() < deadline:
            if self.mon.poll(100):
                ev = recv_monitor_message(self.mon)["event"]
                self.counts[ev] = self.counts.get(ev, 0) + 1
        return self.counts

    def close(self) -> None:
        self.sock.disable_monitor()
        self.mon.close(linger=0)


OK, AUTH_FAILED, PROTO_FAILED, FAILED = (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                                         zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


# ------------------------------------------------------------------------------------------------- ipc
def test_ipc_round_trip_between_processes():
    with ChannelHub() as hub:
        assert hub.keys is None and hub.ipc_dir is not None
        _round_trip_with_process(hub, None)


def test_ipc_round_trip_threads_and_recv_semantics():
    with ChannelHub() as hub:
        req, req_addr = hub.bind("push", "req")
        out, out_addr = hub.bind("pull", "out", from_worker_decoder)
        assert req_addr.startswith("ipc://") and out_addr.startswith("ipc://")
        assert out.recv(timeout_ms=0) is None  # poll
        assert out.recv_many(timeout_ms=50) == []
        w_req = connect("pull", req_addr, to_worker_decoder)
        w_out = connect("push", out_addr)
        try:
            req.send(_add("a"))
            req.send(AbortRequest(rid="a"))
            assert w_req.recv(timeout_ms=5000) == _add("a")
            assert w_req.recv(timeout_ms=5000) == AbortRequest(rid="a")

            def produce() -> None:
                for i in range(10):
                    w_out.send(_step(f"s{i}"))

            t = threading.Thread(target=produce)
            t.start()
            t.join(5)
            got: list = []
            deadline = time.monotonic() + 5
            while len(got) < 10 and time.monotonic() < deadline:
                got.extend(out.recv_many(timeout_ms=500, max_items=4))
            assert [g.outputs[0].rid for g in got] == [f"s{i}" for i in range(10)]
        finally:
            w_req.close()
            w_out.close()


def test_ipc_dir_private_and_removed_on_close():
    hub = ChannelHub()
    d = hub.ipc_dir
    assert d is not None
    st = os.stat(d)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.getuid()
    _, a1 = hub.bind("push", "requests-0")
    _, a2 = hub.bind("pull", "outputs", from_worker_decoder)
    paths = [a[len("ipc://"):] for a in (a1, a2)]
    for p in paths:
        assert os.path.dirname(p) == d
        assert stat.S_ISSOCK(os.stat(p).st_mode)
    with pytest.raises(ValueError, match="name"):
        hub.bind("push", "outputs")  # duplicate
    with pytest.raises(ValueError, match="name"):
        hub.bind("push", "../escape")
    hub.close()
    hub.close()  # idempotent
    assert not os.path.exists(d)
    for p in paths:
        assert not os.path.exists(p)


def test_send_to_absent_peer_times_out_instead_of_hanging():
    with ChannelHub() as hub:
        req, _ = hub.bind("push", "req", send_timeout_ms=200)
        t0 = time.monotonic()
        with pytest.raises(SendTimeout):
            req.send(_add())
        assert time.monotonic() - t0 < 3
        with pytest.raises(SendTimeout):
            req.send(_add(), timeout_ms=0)


# ------------------------------------------------------------------------------------------------- keys
def test_curve_keys_client_copy_and_no_secret_in_repr():
    keys = CurveKeys.generate()
    assert len(keys.server_public) == 40 and len(keys.client_secret) == 40
    assert keys.server_public != keys.client_public
    client = keys.for_client()
    assert client.server_secret is None
    assert client.server_public == keys.server_public and client.client_secret == keys.client_secret
    assert pickle.loads(pickle.dumps(client)) == client  # travels in start-up args
    for text in (repr(keys), str(keys)):
        assert keys.server_secret.decode() not in text and keys.client_secret.decode() not in text
    assert CurveKeys.generate().server_public != keys.server_public


# ------------------------------------------------------------------------------------------------- tcp
def test_tcp_curve_round_trip_between_processes():
    with ChannelHub(use_tcp=True) as hub:
        assert hub.keys is not None and hub.ipc_dir is None
        _round_trip_with_process(hub, hub.keys.for_client())


def test_tcp_binds_loopback_real_port():
    with ChannelHub(use_tcp=True) as hub:
        _, addr = hub.bind("pull", "outputs", from_worker_decoder)
        assert addr.startswith("tcp://127.0.0.1:")
        port = int(addr.rsplit(":", 1)[1])
        assert port != 0
        conns = psutil.Process().net_connections(kind="inet")
        listening = [c for c in conns if c.status == psutil.CONN_LISTEN]
        assert any(c.laddr.ip == "127.0.0.1" and c.laddr.port == port for c in listening), listening
        assert not any(c.laddr.ip in ("0.0.0.0", "::") for c in listening), listening
        # The system-wide view agrees for this process.
        mine = [c for c in psutil.net_connections(kind="inet") if c.pid in (os.getpid(), None)
                and c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert mine and all(c.laddr.ip == "127.0.0.1" for c in mine)


def test_tcp_requires_keys_on_connect():
    with ChannelHub(use_tcp=True) as hub:
        _, addr = hub.bind("pull", "outputs", from_worker_decoder)
        with pytest.raises(ValueError, match="keys"):
            connect("push", addr, None, None)
    with pytest.raises(ValueError, match="address"):
        connect("push", "udp://127.0.0.1:5", None, None)


def test_tcp_client_with_foreign_keypair_is_rejected():
    """Knowing the server's public key is not enough: the client keypair must be one the hub issued."""
    with ChannelHub(use_tcp=True) as hub:
        assert hub.keys is not None
        out, addr = hub.bind("pull", "outputs", from_worker_decoder)
        watch = _HandshakeWatch(out.socket)
        own_pub, own_sec = zmq.curve_keypair()
        rogue_keys = CurveKeys(server_public=hub.keys.server_public, server_secret=None,
                               client_public=own_pub, client_secret=own_sec)
        rogue = connect("push", addr, None, rogue_keys)
        try:
            rogue.send(_step("evil"))  # connect side queues; it must never be delivered
            assert out.recv(timeout_ms=REJECT_WAIT_MS) is None
            counts = watch.wait(lambda c: c[AUTH_FAILED] or c[OK])
            assert counts[AUTH_FAILED] >= 1 and counts[OK] == 0, counts
        finally:
            rogue.close()
            watch.close()
        # The legitimate client still gets through on the same socket.
        good = connect("push", addr, None, hub.keys.for_client())
        try:
            good.send(_step("ok"))
            msg = out.recv(timeout_ms=5000)
            assert msg is not None and msg.outputs[0].rid == "ok"
        finally:
            good.close()


def test_tcp_rogue_puller_cannot_steal_requests():
    """A rogue PULL on the request socket must not be added to the PUSH's round robin."""
    with ChannelHub(use_tcp=True) as hub:
        assert hub.keys is not None
        req, addr = hub.bind("push", "requests-0", send_timeout_ms=5000)
        watch = _HandshakeWatch(req.socket)
        own_pub, own_sec = zmq.curve_keypair()
        rogue = connect("pull", addr, to_worker_decoder,
                        CurveKeys(hub.keys.server_public, None, own_pub, own_sec))
        good = connect("pull", addr, to_worker_decoder, hub.keys.for_client())
        try:
            # Both handshakes are over before anything is sent, so a rogue that got in would be in the
            # round robin and take every other request.
            counts = watch.wait(lambda c: c[OK] >= 2 or (c[OK] and c[AUTH_FAILED]))
            assert counts[OK] == 1 and counts[AUTH_FAILED] >= 1, counts
            for i in range(6):
                req.send(_add(f"r{i}"))
            got = []
            deadline = time.monotonic() + 5
            while len(got) < 6 and time.monotonic() < deadline:
                got.extend(good.recv_many(timeout_ms=500))
            assert [m.rid for m in got] == [f"r{i}" for i in range(6)]
            assert rogue.recv(timeout_ms=300) is None
        finally:
            rogue.close()
            good.close()
            watch.close()


def test_tcp_plain_client_is_rejected():
    with ChannelHub(use_tcp=True) as hub:
        out, addr = hub.bind("pull", "outputs", from_worker_decoder)
        watch = _HandshakeWatch(out.socket)
        ctx = zmq.Context()
        plain = ctx.socket(zmq.PUSH)
        plain.linger = 0
        try:
            plain.connect(addr)
            plain.send(encoder.encode(_step("evil")))
            assert out.recv(timeout_ms=REJECT_WAIT_MS) is None
            # A NULL greeting to a CURVE socket is a mechanism mismatch (FAILED_PROTOCOL). What must hold is that
            # the frame never arrives and no handshake succeeds; the rejection event itself has, twice in full
            # suites on the 2-core machine, not come within 20 s (never reproduced alone or under CPU load), so
            # the test waits up to 10 s for the handshake's end but requires only that it did not succeed.
            rejected = (PROTO_FAILED, AUTH_FAILED, FAILED)
            counts = watch.wait(lambda c: c[OK] or any(c[e] for e in rejected), timeout_s=10.0)
            assert counts[OK] == 0, counts
            assert out.recv(timeout_ms=200) is None  # still nothing delivered
        finally:
            plain.close()
            ctx.term()
            watch.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "*", "[::]"])
def test_wildcard_host_refused_without_opt_in(host):
    with pytest.raises(ValueError, match="host"):
        ChannelHub(host=host)
    with pytest.raises(ValueError, match="host"):
        ChannelHub(host=host, use_tcp=True)


def test_wildcard_host_allowed_with_opt_in_and_advertised():
    with ChannelHub(host="0.0.0.0", allow_wildcard=True, advertise_host="127.0.0.1") as hub:
        out, addr = hub.bind("pull", "outputs", from_worker_decoder)
        assert addr.startswith("tcp://127.0.0.1:") and not addr.endswith(":0")
        assert hub.keys is not None
        w = connect("push", addr, None, hub.keys.for_client())
        try:
            w.send(_step("x"))
            assert out.recv(timeout_ms=5000) is not None
        finally:
            w.close()


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_tcp_ipv6_loopback_round_trip():
    with ChannelHub(host="::1") as hub:
        assert hub.keys is not None
        out, addr = hub.bind("pull", "outputs", from_worker_decoder)
        assert addr.startswith("tcp://[::1]:")
        w = connect("push", addr, None, hub.keys.for_client())
        try:
            w.send(_step("v6"))
            msg = out.recv(timeout_ms=5000)
            assert msg is not None and msg.outputs[0].rid == "v6"
        finally:
            w.close()


# ------------------------------------------------------------------------------------------------- bad frames
def _raw_push(address: str) -> tuple[zmq.Context, zmq.Socket]:
    """A peer that sends raw frames, bypassing the channel's encoder (what a buggy or hostile peer does)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    sock.connect(address)
    return ctx, sock


def _bad_sampling_frame(rid: str) -> bytes:
    """An AddRequest whose SamplingParams was mutated after construction: its type checks, its validation fails."""
    sp = SamplingParams(max_new_tokens=4)
    sp.max_new_tokens = -5
    return encoder.encode(AddRequest(rid=rid, prompt_ids=[1, 2], sampling=sp))


def _wrong_typed_frame(rid: str) -> bytes:
    sp = SamplingParams(max_new_tokens=4)
    sp.temperature = "hot"  # type: ignore[assignment]
    return encoder.encode(AddRequest(rid=rid, prompt_ids=[1, 2], sampling=sp))


BAD_FRAMES = [
    b"\xc1 not msgpack at all",                                   # 0xc1 is never valid msgpack
    b"",                                                           # empty frame
    encoder.encode({"type": "NoSuchMessage", "rid": "x"}),         # unknown tag
    encoder.encode({"type": "AbortRequest", "rid": 42}),           # wrong-typed field
    encoder.encode({"type": "AbortRequest"}),                      # missing field
    encoder.encode([1, 2, 3]),                                     # not a struct at all
]


def test_bad_frames_are_dropped_counted_and_good_ones_arrive_in_order():
    seen: list[tuple[bytes, str]] = []
    with ChannelHub() as hub:
        w_req, req_addr = hub.bind("pull", "req", to_worker_decoder,
                                   on_bad_frame=lambda data, err: seen.append((data, type(err).__name__)))
        ctx, raw = _raw_push(req_addr)
        try:
            bad = BAD_FRAMES + [_bad_sampling_frame("bad-1"), _wrong_typed_frame("bad-2")]
            for i, frame in enumerate(bad):
                raw.send(encoder.encode(AbortRequest(rid=f"good-{i}")))
                raw.send(frame)
            raw.send(encoder.encode(AbortRequest(rid="last")))
            got: list = []
            deadline = time.monotonic() + 5
            while len(got) < len(bad) + 1 and time.monotonic() < deadline:
                got.extend(w_req.recv_many(timeout_ms=500))
            assert [m.rid for m in got] == [f"good-{i}" for i in range(len(bad))] + ["last"]
            assert w_req.dropped == len(bad)
            assert [data for data, _ in seen] == bad
            assert all(name in ("DecodeError", "ValidationError") for _, name in seen)
            # recv (not only recv_many) skips bad frames too, and a bad frame alone is a timeout, not an error
            raw.send(b"\xc1")
            assert w_req.recv(timeout_ms=300) is None
            raw.send(b"\xc1")
            raw.send(encoder.encode(Shutdown()))
            assert w_req.recv(timeout_ms=5000) == Shutdown()
            assert w_req.dropped == len(bad) + 2
        finally:
            raw.close()
            ctx.term()


def test_bad_frame_hook_that_raises_does_not_break_recv():
    def hook(data: bytes, err: Exception) -> None:
        raise RuntimeError("hook bug")

    with ChannelHub() as hub:
        out, out_addr = hub.bind("pull", "out", from_worker_decoder, on_bad_frame=hook)
        ctx, raw = _raw_push(out_addr)
        try:
            raw.send(b"garbage")
            raw.send(encoder.encode(_step("ok")))
            msg = out.recv(timeout_ms=5000)  # the front end's side: its engine loop must survive too
            assert isinstance(msg, StepOutput) and msg.outputs[0].rid == "ok"
            assert out.dropped == 1
        finally:
            raw.close()
            ctx.term()
