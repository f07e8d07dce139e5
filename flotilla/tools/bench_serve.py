"""``flotilla bench-serve``: load an OpenAI-compatible server with streaming completions and report what a user sees.

Targets a running server (``--url``) or starts one in this process over an engine (``--model`` /
``--model-shape`` plus the engine options, or ``--synthetic``: the model-free engine of
``flotilla.server.synthetic``, which measures the HTTP server's own cost per token). The load comes from client
processes of their own (``--client-processes``), so the client never shares a GIL with the server it measures.

Work: ``-n`` requests, at most ``--concurrency`` in flight, arriving all at once (``--request-rate inf``) or as a
Poisson process; prompts of ``--input-len`` random token ids (``--dataset random-ids``, sent as a token-id
prompt) or random words (``random-text``); ``--output-len`` tokens each with ``ignore_eos``, greedy. With
``--random-range-ratio r`` each length is drawn uniformly from [len*(1-r), len*(1+r)].

Figures: TTFT (send to first content chunk), ITL (gaps between content chunks, as vLLM's bench counts them: a
chunk carrying k coalesced tokens is one gap), TPOT ((last - first chunk) / (tokens - 1) per request), E2E, all
in ms at p50/p90/p99; output tok/s (the usage the server reports, over the wall time from first send to last
byte); and ``cut``: streams that ended without ``data: [DONE]``, which must be 0. With an in-process server,
the server process's CPU per output token (and its HTTP and engine threads' shares). ``--offline`` runs the same
work through ``flotilla bench``'s offline path (``engine.stream_async`` in-process, every request submitted at
once, as ``flotilla bench`` does) first and prints both; its prompts have the same lengths but other random ids,
so the served run finds none of them in the prefix cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flotilla.tools.bench import percentiles_ms

_WORDS = ("the of and to in is was for on that with as by at from his her an which or be are this had not but "
          "what all were when we there can said each she do how their if will up other about out many then them "
          "these so some would make like him into time has look two more write go see number way could people my "
          "than first water been call who oil its now find long down day did get come made may part").split()


@dataclass
class Spec:
    """One request of the workload."""

    prompt: str | list[int]
    output_len: int


@dataclass
class Outcome:
    """One request as the client saw it (perf_counter seconds)."""

    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival of every content chunk
    end: float = 0.0
    output_tokens: int = 0
    done: bool = False        # saw data: [DONE]
    finished: bool = False    # saw a finish_reason
    status: int = 0
    error: str | None = None  # an error event, a non-200, or an exception (the stream was cut)


# ---------------------------------------------------------------------------------------------- workload
def _lengths(n: int, mean: int, ratio: float, rng: random.Random) -> list[int]:
    if ratio <= 0:
        return [mean] * n
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def make_specs(n: int, input_len: int, output_len: int, ratio: float = 0.0, dataset: str = "random-ids",
               vocab: int = 10000, seed: int = 0) -> list[Spec]:
    """The requests; random ids are drawn below ``vocab``."""
    rng = random.Random(seed)
    ins, outs = _lengths(n, input_len, ratio, rng), _lengths(n, output_len, ratio, rng)
    specs = []
    for i, o in zip(ins, outs):
        if dataset == "random-ids":
            specs.append(Spec([rng.randrange(vocab) for _ in range(i)], o))
        else:
            specs.append(Spec(" ".join(rng.choice(_WORDS) for _ in range(i)), o))
    return specs


def twin_specs(specs: list[Spec], vocab: int, seed: int) -> list[Spec]:
    """Requests of exactly the same lengths with other random prompts."""
    rng = random.Random(seed)
    out = []
    for s in specs:
        if isinstance(s.prompt, list):
            out.append(Spec([rng.randrange(vocab) for _ in s.prompt], s.output_len))
        else:
            out.append(Spec(" ".join(rng.choice(_WORDS) for _ in s.prompt.split(" ")), s.output_len))
    return out


# ---------------------------------------------------------------------------------------------- client
def _body(spec: Spec, model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": spec.prompt, "max_tokens": spec.output_len, "temperature": 0.0,
                            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _one_stream(client: Any, url: str, spec: Spec, model: str, headers: dict[str, str]) -> Outcome:
    out = Outcome(sent=time.perf_counter())
    parser = _SSEParser(out)
    try:
        async with client.stream("POST", url, json=_body(spec, model, True), headers=headers) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for raw in r.aiter_raw():
                parser.feed(raw, time.perf_counter())
    except Exception as e:  # the connection broke: a cut stream
        out.error = f"{type(e).__name__}: {e}"
    finally:
        out.end = time.perf_counter()
    return out


class _SSEParser:
    """Feeds bytes of an SSE body into an ``Outcome`` (shared by both clients)."""

    def __init__(self, out: Outcome):
        import msgspec

        self.out, self.buf, self.decode = out, b"", msgspec.json.decode

    def feed(self, raw: bytes, now: float) -> None:
        out = self.out
        self.buf += raw
        *events, self.buf = self.buf.split(b"\n\n")
        for ev in events:
            if not ev.startswith(b"data: "):
                continue
            data = ev[6:]
            if data == b"[DONE]":
                out.done = True
                continue
            obj = self.decode(data)
            if "error" in obj:
                out.error = str(obj["error"].get("message"))
                continue
            choices = obj.get("choices") or ()
            # every chunk with a choice carries tokens (the server sends none without), even when their text
            # is empty: a shape's stand-in tokenizer decodes most of a dummy model's ids to nothing
            if choices and "role" not in (choices[0].get("delta") or {}):
                out.chunks.append(now)
            for ch in choices:
                if ch.get("finish_reason"):
                    out.finished = True
            if obj.get("usage"):
                out.output_tokens = int(obj["usage"].get("completion_tokens") or 0)


class RawClient:
    """A minimal HTTP/1.1 client on asyncio streams: keep-alive connections, ``Content-Length`` or chunked
    bodies, nothing else.

    Measured on this project's CPU box, one httpx client process saturates its core at about 10k SSE chunks/s
    (httpcore and h11 per chunk); at 256 streams of an engine doing 30k tok/s that is the client's ceiling,
    not the server's. This client does roughly a fifth of the work per chunk. ``--client httpx`` keeps the
    plain httpx client for comparison.
    """

    def __init__(self, base_url: str, concurrency: int):
        from urllib.parse import urlsplit

        u = urlsplit(base_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def _conn(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer, since = self._idle.pop()
            if time.monotonic() - since < 2.0 and not reader.at_eof():  # uvicorn closes idle ones after 5 s
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    async def request(self, path: str, body: bytes, headers: dict[str, str], on_body: Any) -> int:
        """POST; ``on_body(bytes, now)`` for every piece of the body; returns the status."""
        reader, writer = await self._conn()
        try:
            return await self._exchange(reader, writer, path, body, headers, on_body)
        except BaseException:
            writer.close()  # mid-response: the connection's state is unknown, never reuse it
            raise

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes,
                        headers: dict[str, str], on_body: Any) -> int:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
        writer.write(head.encode() + body)
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        keep = hdrs.get("connection", "").lower() != "close"
        if hdrs.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                data = await reader.readexactly(size + 2)
                on_body(data[:-2], time.perf_counter())
        elif "content-length" in hdrs:
            on_body(await reader.readexactly(int(hdrs["content-length"])), time.perf_counter())
        else:
            on_body(await reader.read(), time.perf_counter())
            keep = False
        if keep:
            self._idle.append((reader, writer, time.monotonic()))
        else:
            writer.close()
        return status

    async def aclose(self) -> None:
        for _, w, _ in self._idle:
            w.close()
        self._idle.clear()


async def _one_raw(client: RawClient, spec: Spec, model: str, headers: dict[str, str], stream: bool) -> Outcome:
    import msgspec

    out = Outcome(sent=time.perf_counter())
    parser = _SSEParser(out)
    body = bytearray()
    try:
        payload = msgspec.json.encode(_body(spec, model, stream))
        out.status = await client.request("/v1/completions", payload, headers,
                                          parser.feed if stream else (lambda b, now: body.extend(b)))
        if out.status != 200:
            out.error = f"HTTP {out.status}: {(bytes(body) or parser.buf)[:200]!r}"
        elif not stream:
            out.output_tokens = int(msgspec.json.decode(bytes(body))["usage"]["completion_tokens"])
            out.chunks, out.done, out.finished = [time.perf_counter()], True, True
    except Exception as e:  # the connection broke: a cut stream
        out.error = f"{type(e).__name__}: {e}"
    finally:
        out.end = time.perf_counter()
    return out


async def _one_plain(client: Any, url: str, spec: Spec, model: str, headers: dict[str, str]) -> Outcome:
    out = Outcome(sent=time.perf_counter())
    try:
        r = await client.post(url, json=_body(spec, model, False), headers=headers)
        out.status = r.status_code
        out.end = time.perf_counter()
        if r.status_code != 200:
            out.error = f"HTTP {r.status_code}: {r.text[:200]}"
            return out
        body = r.json()
        out.output_tokens = int(body["usage"]["completion_tokens"])
        out.chunks = [out.end]
        out.done = out.finished = True
    except Exception as e:
        out.error, out.end = f"{type(e).__name__}: {e}", time.perf_counter()
    return out


async def run_load(base_url: str, specs: list[Spec], concurrency: int, request_rate: float = math.inf,
                   stream: bool = True, model: str | None = None, api_key: str | None = None,
                   seed: int = 0, client_kind: str = "raw") -> tuple[list[Outcome], float]:
    """Send every spec, at most ``concurrency`` in flight, arriving at ``request_rate``/s (Poisson; inf: at
    once); returns the outcomes in spec order and the wall time from the first send to the last byte."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # idle connections expire here before uvicorn's 5 s keep-alive closes them (a request sent on a connection
    # the server is closing fails in the client: a race, not the server's doing)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(None, connect=60),
                                 http1=True) as client:
        if model is None:
            model = (await client.get("/v1/models", headers=headers)).json()["data"][0]["id"]
        sem = asyncio.Semaphore(concurrency)
        raw = RawClient(base_url, concurrency) if client_kind == "raw" else None

        async def guarded(spec: Spec) -> Outcome:
            async with sem:
                if raw is not None:
                    return await _one_raw(raw, spec, model, headers, stream)
                if stream:
                    return await _one_stream(client, "/v1/completions", spec, model, headers)
                return await _one_plain(client, "/v1/completions", spec, model, headers)

        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        tasks = []
        for spec in specs:
            tasks.append(asyncio.ensure_future(guarded(spec)))
            if math.isfinite(request_rate) and request_rate > 0:
                await asyncio.sleep(float(rng.exponential(1.0 / request_rate)))
        outcomes = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - t0
        if raw is not None:
            await raw.aclose()
        return outcomes, wall


def _client_main(base_url: str, specs: list[Spec], concurrency: int, rate: float, stream: bool, model: str | None,
                 api_key: str | None, seed: int, client_kind: str, conn: Any) -> None:
    """A client process: runs its share of the load (on uvloop when installed) and sends back the outcomes."""
    try:
        try:
            import uvloop

            factory: Any = uvloop.new_event_loop
        except ImportError:
            factory = None
        with asyncio.Runner(loop_factory=factory) as runner:
            outcomes, _ = runner.run(run_load(base_url, specs, concurrency, rate, stream, model, api_key, seed,
                                              client_kind))
        conn.send(("ok", [asdict(o) for o in outcomes]))
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def load_in_processes(base_url: str, specs: list[Spec], concurrency: int, rate: float = math.inf,
                      stream: bool = True, model: str | None = None, api_key: str | None = None, seed: int = 0,
                      processes: int = 1, client_kind: str = "raw") -> tuple[list[Outcome], float]:
    """``run_load`` split over ``processes`` spawned client processes (specs dealt round-robin, concurrency and
    rate divided); the wall time is from the earliest send to the latest end."""
    ctx = multiprocessing.get_context("spawn")
    procs, pipes = [], []
    for k in range(processes):
        share = specs[k::processes]
        if not share:
            continue
        c = max(1, concurrency // processes + (1 if k < concurrency % processes else 0))
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_client_main, args=(base_url, share, c, rate / processes, stream, model, api_key,
                                                   seed + k, client_kind, child), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        pipes.append((k, parent))
    merged: list[Outcome | None] = [None] * len(specs)
    for k, conn in pipes:
        kind, payload = conn.recv()
        if kind != "ok":
            raise RuntimeError(f"client process {k} failed: {payload}")
        for j, o in enumerate(payload):
            merged[k + j * processes] = Outcome(**o)
    for p in procs:
        p.join(timeout=10)
    outs = [o for o in merged if o is not None]
    return outs, max(o.end for o in outs) - min(o.sent for o in outs)


# ---------------------------------------------------------------------------------------------- figures
def summarize(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.error is None and o.done and o.finished]
    tokens = sum(o.output_tokens for o in outcomes)
    ttft = [o.chunks[0] - o.sent for o in ok if o.chunks]
    itl = [b - a for o in ok for a, b in zip(o.chunks, o.chunks[1:])]
    tpot = [(o.chunks[-1] - o.chunks[0]) / (o.output_tokens - 1) for o in ok if o.chunks and o.output_tokens > 1]
    e2e = [o.end - o.sent for o in ok]
    cut = [o for o in outcomes if not o.done]
    errors = [o.error for o in outcomes if o.error]
    return {"num_requests": len(outcomes), "completed": len(ok), "cut": len(cut), "errors": len(errors),
            "error_samples": errors[:5], "duration_s": wall_s, "output_tokens": tokens,
            "output_throughput": tokens / wall_s if wall_s > 0 else 0.0,
            "request_throughput": len(ok) / wall_s if wall_s > 0 else 0.0,
            "chunks": sum(len(o.chunks) for o in ok),
            "chunks_per_request": (sum(len(o.chunks) for o in ok) / len(ok)) if ok else 0.0,
            "ttft_ms": percentiles_ms(ttft), "itl_ms": percentiles_ms(itl), "tpot_ms": percentiles_ms(tpot),
            "e2e_ms": percentiles_ms(e2e)}


class CpuMeter:
    """CPU seconds this process (the in-process server) spends, in all and in the named threads."""

    def __init__(self, threads: dict[str, int | None], http_pids: list[int | None] | None = None):
        import psutil

        self._proc = psutil.Process()
        self._names = {tid: name for name, tid in threads.items() if tid is not None}
        self._http = [psutil.Process(p) for p in (http_pids or []) if p is not None]
        self._t0 = self._sample()

    def _sample(self) -> dict[str, float]:
        times = self._proc.cpu_times()
        out = {"process": times.user + times.system}
        for th in self._proc.threads():
            if th.id in self._names:
                out[self._names[th.id]] = th.user_time + th.system_time
        if self._http:  # --api-server-count N: the HTTP processes, apart from this (the engine) process
            total = 0.0
            for p in self._http:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except Exception:  # psutil.NoSuchProcess: a process that died keeps its last reading out
                    pass
            out["http_processes"] = total
        return out

    def stop(self) -> dict[str, float]:
        t1 = self._sample()
        return {k: t1[k] - self._t0.get(k, 0.0) for k in t1}


# ---------------------------------------------------------------------------------------------- engines
def _start_engine(args: argparse.Namespace) -> tuple[Any, str, Path | None]:
    """(engine, served name, temporary folder to remove) for an in-process server."""
    if args.synthetic:
        from transformers import AutoTokenizer

        from flotilla.model.shapes import write_shape
        from flotilla.server.synthetic import SyntheticEngine

        dp = getattr(args, "dp_size", 1)
        folder = write_shape(args.model_shape or "qwen3-0.6b")  # kept: HTTP processes load the tokenizer from it
        args.tokenizer = str(folder)
        eng = SyntheticEngine(AutoTokenizer.from_pretrained(str(folder)), dp_size=dp, step_ms=args.synthetic_step_ms,
                              max_num_seqs=getattr(args, "max_num_seqs", 256),
                              detokenize_in_replicas=getattr(args, "detokenize_in_replicas", True),
                              stream_interval=getattr(args, "stream_interval", 1))
        return eng, f"synthetic:{args.model_shape or 'qwen3-0.6b'}", folder
    from flotilla.launch.factory import make_engine

    tmp = None
    if args.model_shape:
        from flotilla.model.shapes import write_shape

        tmp = write_shape(args.model_shape)
        args.model = str(tmp)
        args.load_format = "dummy"
    if not getattr(args, "model", None):
        raise SystemExit("flotilla bench-serve: pass --url, --model, --model-shape or --synthetic")
    try:
        return make_engine(args), args.model_shape or args.model, tmp
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _offline(engine: Any, specs: list[Spec]) -> dict[str, Any]:
    """The same work through ``flotilla bench``'s offline path (``stream_async`` in this process)."""
    from flotilla.tools.bench import Workload, _flotilla_requests, summarize as offline_summary

    prompts = [s.prompt if isinstance(s.prompt, list) else list(engine.tokenizer(s.prompt)["input_ids"])
               for s in specs]
    params = [{"max_new_tokens": s.output_len, "temperature": 0.0, "ignore_eos": True} for s in specs]
    records = asyncio.run(_flotilla_requests(engine, prompts, params))
    return offline_summary(Workload("bench-serve", prompts, [s.output_len for s in specs]), records)


# ---------------------------------------------------------------------------------------------- CLI
def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    from flotilla.launch.factory import add_engine_args

    t = p.add_argument_group("target (one of)")
    t.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000")
    t.add_argument("--model-shape", default=None, help="start a server over a built-in shape with dummy weights "
                   "(qwen3-0.6b, llama-3.1-8b, ...); with --synthetic, whose tokenizer to use")
    t.add_argument("--synthetic", action="store_true", help="start a server over the model-free engine "
                   "(flotilla.server.synthetic): measures the server's own cost per token")
    t.add_argument("--synthetic-step-ms", type=float, default=5.0, help="with --synthetic: ms per decode step "
                   "(0: as fast as the front end takes them)")
    w = p.add_argument_group("work")
    w.add_argument("-n", "--num-requests", type=int, default=1024)
    w.add_argument("--concurrency", type=int, default=256, help="requests in flight at most")
    w.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: at once)")
    w.add_argument("--input-len", type=int, default=256)
    w.add_argument("--output-len", type=int, default=256)
    w.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]; 0: fixed")
    w.add_argument("--dataset", default="random-ids", choices=["random-ids", "random-text"])
    w.add_argument("--stream", default=True, action=argparse.BooleanOptionalAction)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--max-token-id", type=int, default=None, help="random-ids below this (default: the in-process "
                   "engine's vocabulary; 500 with --url)")
    w.add_argument("--warmup", type=int, default=16, help="untimed requests first (16 input, 16 output tokens)")
    w.add_argument("--served-model-name", default=None, help="default: what /v1/models lists")
    w.add_argument("--api-key", default=None)
    w.add_argument("--client-processes", type=int, default=1, help="client processes sharing the load")
    w.add_argument("--client", default="raw", choices=["raw", "httpx"], help="raw: a minimal HTTP/1.1 client "
                   "(the default: one httpx process tops out near 10k chunks/s); httpx: httpx.AsyncClient")
    w.add_argument("--offline", action="store_true", help="first run the same work offline in this process and "
                   "print both (needs an in-process engine)")
    w.add_argument("--json", default=None, help="write the results here")
    w.add_argument("--api-server-count", type=int, default=1, help="in-process server: HTTP processes over the "
                   "engine in this process (serve --api-server-count)")
    w.add_argument("--uvicorn-http", default="auto", choices=["auto", "h11", "httptools"],
                   help="in-process server: uvicorn's HTTP parser")
    w.add_argument("--uvicorn-loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                   help="in-process server: uvicorn's event loop")
    add_engine_args(p)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {"config": {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf")
                                         for k, v in vars(args).items() if k != "fn"}}
    engine, tmp = None, None
    server: Any = None
    try:
        url, model = args.url, args.served_model_name
        threads: dict[str, int | None] = {}
        if url is None:
            from flotilla.server import ServerThread, build_app

            engine, name, tmp = _start_engine(args)
            model = model or name
            vocab = args.max_token_id or int(getattr(engine, "vocab_size", 0) or len(engine.tokenizer))
            specs, warm = _specs(args, vocab)
            if args.offline:
                if warm:
                    _offline(engine, warm)
                # the same shape of work with other random prompts: the same ones would be in the prefix cache
                # when the served run comes
                result["offline"] = _offline(engine, twin_specs(specs, vocab, args.seed + 7919))
            threads = {"engine_thread": getattr(engine, "thread_id", None) or _engine_thread(engine)}
            if args.api_server_count > 1:
                from flotilla.server.http_processes import ApiServers

                server = ApiServers(args.api_server_count, tokenizer=getattr(args, "tokenizer", None) or args.model,
                                    model_name=model, api_key=args.api_key).start()
                server.set_engine(engine)
                threads["api_loop"] = server.service.loop_thread_id
            else:
                server = ServerThread(build_app(engine, model, args.api_key), http=args.uvicorn_http,
                                      loop=args.uvicorn_loop).start()
                threads["http_thread"] = server.thread_id
            url = server.url
        elif args.offline:
            raise SystemExit("flotilla bench-serve: --offline needs an in-process engine (not --url)")
        else:
            specs, warm = _specs(args, args.max_token_id or 500)
        if warm:
            load_in_processes(url, warm, min(len(warm), args.concurrency), math.inf, args.stream, model, args.api_key,
                              args.seed, 1, args.client)
        meter = None
        replica_cpu0 = float(getattr(engine, "replica_cpu_s", 0.0) or 0.0)
        if server is not None:
            meter = CpuMeter(threads, server.processes.pids() if args.api_server_count > 1 else None)
        outcomes, wall = load_in_processes(url, specs, args.concurrency, args.request_rate, args.stream, model,
                                           args.api_key, args.seed, args.client_processes, args.client)
        served = summarize(outcomes, wall)
        if meter is not None:
            cpu = meter.stop()
            if engine is not None and hasattr(engine, "replica_cpu_s"):
                # the synthetic engine's "replicas" detokenize in its thread (a real replica does it in a process
                # of its own): counted apart, and left out of what the server process spends
                cpu["replica_texts"] = float(engine.replica_cpu_s) - replica_cpu0
                cpu["process"] -= cpu["replica_texts"]
                if "engine_thread" in cpu:
                    cpu["engine_thread"] -= cpu["replica_texts"]
            toks = max(1, served["output_tokens"])
            served["server_cpu_s"] = cpu
            served["server_us_per_token"] = {k: v / toks * 1e6 for k, v in cpu.items()}
            chunks = max(1, served["chunks"])
            served["server_us_per_chunk"] = {k: v / chunks * 1e6 for k, v in cpu.items()}
        result["serve"] = served
        if "offline" in result:
            result["serve_over_offline"] = (served["output_throughput"]
                                            / max(1e-9, result["offline"]["output_throughput"]))
    finally:
        if server is not None:
            server.stop()
        if engine is not None:
            engine.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["serve"]["cut"] == 0 and result["serve"]["errors"] == 0 else 1


def _specs(args: argparse.Namespace, vocab: int) -> tuple[list[Spec], list[Spec]]:
    """(timed requests, warm-up requests)."""
    specs = make_specs(args.num_requests, args.input_len, args.output_len, args.random_range_ratio, args.dataset,
                       vocab, args.seed)
    return specs, make_specs(args.warmup, 16, 16, 0.0, args.dataset, vocab, args.seed + 1)


def _engine_thread(engine: Any) -> int | None:
    th = getattr(engine, "_thread", None)
    return getattr(th, "native_id", None)


def format_result(r: dict[str, Any]) -> str:
    s = r["serve"]
    lines = [f"requests {s['num_requests']}  completed {s['completed']}  cut {s['cut']}  errors {s['errors']}  "
             f"duration {s['duration_s']:.2f} s  chunks/request {s['chunks_per_request']:.1f}",
             f"{'':<22}{'output tok/s':>14}{'TTFT p50/p90/p99 ms':>26}{'ITL p50/p90/p99 ms':>26}"]

    def row(label: str, x: dict[str, Any]) -> str:
        ttft, itl = x["ttft_ms"], x["itl_ms"]
        return (f"{label:<22}{x['output_throughput']:>14,.0f}"
                f"{ttft['p50']:>10.1f}{ttft['p90']:>8.1f}{ttft['p99']:>8.1f}"
                f"{itl['p50']:>10.2f}{itl['p90']:>8.2f}{itl['p99']:>8.2f}")

    if "offline" in r:
        lines.append(row("offline (in-process)", r["offline"]))
    lines.append(row("served (HTTP)", s))
    e2e, tpot = s["e2e_ms"], s["tpot_ms"]
    lines.append(f"E2E ms p50 {e2e['p50']:.1f}  p90 {e2e['p90']:.1f}  p99 {e2e['p99']:.1f};  "
                 f"TPOT ms p50 {tpot['p50']:.2f}  p99 {tpot['p99']:.2f}")
    if "serve_over_offline" in r:
        lines.append(f"served / offline = {r['serve_over_offline']:.2f}x")
    if "server_us_per_token" in s:
        us = s["server_us_per_token"]
        lines.append("server CPU us/output token: " + ", ".join(f"{k} {v:.1f}" for k, v in us.items()))
        us = s["server_us_per_chunk"]
        lines.append("server CPU us/chunk:        " + ", ".join(f"{k} {v:.1f}" for k, v in us.items()))
    for e in s["error_samples"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:  # python -m flotilla.tools.bench_serve
    p = argparse.ArgumentParser(prog="flotilla bench-serve", description=__doc__.splitlines()[0])
    add_bench_serve_args(p)
    return cmd_bench_serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
