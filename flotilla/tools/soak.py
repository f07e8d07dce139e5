"""A chaos soak: mixed traffic while faults are injected, and checks that nothing is lost or duplicated.

``python -m flotilla.tools.soak --seconds 60 --launcher mp`` (or ``flotilla soak``) runs, for a bounded
time, clients over the Python API and HTTP (streaming and not, random lengths, greedy and seeded sampling,
clients that leave early, bad inputs interleaved) against a dp=2 engine on a tiny random checkpoint, while
an injector SIGKILLs replica processes (one, both at once, or one and then the other 1-3 s later, as rolling
failures do), SIGSTOPs them (for good, or SIGCONT after half or 1.5x the heartbeat timeout), scales up and
down, updates the weights (with the same values, so tokens stay comparable), pauses and resumes, joins a
weight-sync group at an address where nothing listens (it must fail fast, naming the address, while traffic
goes on), and writes garbage frames to the front end's socket; with HTTP clients it also drives the RL routes
under that load (a reload from disk, a join at a bad address, an in-place pause and continue). Every good
request must finish exactly once
with the tokens of an undisturbed run of the same request; every bad input must get a clear error; memory
and open descriptors must stay bounded; and after shutdown no worker process, placement group, private
folder or socket may be left.

``--restart-budget default`` runs the engine's own restart budget (``max_replica_restarts`` per
``restart_window_s``, with backoff) instead of an unlimited one: a group that spends it stays down until the
window refills it, so the injector then takes no replica whose loss would leave none serving (the faults
that kill every replica at once are left to the unlimited runs), waits for ``serving()`` rather than
``healthy()``, and now and then scales to the current size (which restarts a dead group at once). The report
adds the restarts, how long the engine ran degraded, and the faults skipped for want of a spare replica.

It prints a table (requests, faults, completed, lost, duplicated tokens, errors by kind) and writes JSON.
Exit code 0 only when lost == 0, failed == 0, duplicated == 0, wrong == 0, every bad input and the bad join
were refused clearly, and nothing leaked.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from flotilla.sampling import SamplingParams

PROMPTS = ["The capital of France is", "Hello", "Once upon a time", "A", "The quick brown fox jumps over",
           "In a hole in the ground there lived", "Numbers: 1 2 3 4", "Why is the sky blue?"]
MAX_TOKENS = 24
SEEDED = dict(temperature=0.9, top_k=40, seed=7)
# errors that fail the run on their own (the others show in the table: a fault the engine refused clearly,
# such as a scale while a replica restarts, is not a loss)
STRICT_ERRORS = {"fault_join_bad_address", "unclear_error", "bad_input_accepted"}


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)
    faults: collections.Counter = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def error(self, kind: str, detail: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            if len(self.examples) < 20:
                self.examples.append(f"{kind}: {detail[:300]}")

    def fault(self, kind: str) -> None:
        with self.lock:
            self.faults[kind] += 1


def _params(rng: random.Random) -> tuple[dict[str, Any], str]:
    n = rng.randint(1, MAX_TOKENS)
    if rng.random() < 0.7:
        return dict(max_new_tokens=n, temperature=0.0, ignore_eos=True), "greedy"
    return dict(max_new_tokens=n, ignore_eos=True, **SEEDED), "seeded"


def _bad_inputs(vocab: int) -> list[tuple[str, dict[str, Any]]]:
    """(field the error must name, keyword arguments for engine.generate)."""
    return [("max_new_tokens", dict(prompts=["x"], sampling_params={"max_new_tokens": -5})),
            ("temperature", dict(prompts=["x"], sampling_params={"temperature": "hot"})),
            ("input_ids", dict(input_ids=[[vocab + 5]])),
            ("prompt", dict(prompts=["lone \ud800 surrogate"])),
            ("prompt", dict(prompts=[""])),
            ("sampling_params", dict(prompts=["x"], sampling_params={"no_such_field": 1})),
            # issue 29's catalogue: values that once hung a request, crashed a worker or raised a TypeError
            ("top_k", dict(prompts=["x"], sampling_params={"top_k": 2**64})),
            ("stop_token_ids", dict(prompts=["x"], sampling_params={"stop_token_ids": [2**64]})),
            ("stop_token_ids", dict(prompts=["x"], sampling_params={"stop_token_ids": [vocab + 10]})),
            ("seed", dict(prompts=["x"], sampling_params={"seed": 2**70})),
            ("max_new_tokens", dict(prompts=["x"], sampling_params={"max_new_tokens": 2**63})),
            ("top_p", dict(prompts=["x"], sampling_params={"top_p": float("nan")})),
            ("n", dict(prompts=["x"], sampling_params={"n": 10**6})),
            ("stop", dict(prompts=["x"], sampling_params={"stop": 5})),
            ("prompts", dict(prompts=12345)),
            ("prompt", dict(prompts=["x" * 2_000_000]))]


def _signal(pid: int, sig: int) -> None:
    """A signal to a worker that may be gone already (the fleet killed and replaced it)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.stop = threading.Event()
        self.reference: dict[tuple[str, str], list[int]] = {}

    # -------------------------------------------------------------------------------------- set-up
    def make_engine(self):
        from flotilla.tools.tiny import tiny_model_path

        self.path = str(tiny_model_path("llama"))
        opts = dict(device="cpu", dtype="float32", dp_size=2, heartbeat_timeout_s=self.args.heartbeat_timeout_s,
                    failover_timeout_s=120.0, enable_overlap_schedule=self.args.overlap_schedule)
        if self.args.restart_budget == "unlimited":
            opts["max_replica_restarts"] = 1000
        if self.args.launcher == "ray":
            import ray

            from flotilla import RayEngine

            ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
            return RayEngine(model=self.path, **opts)
        from flotilla import Engine

        return Engine(model=self.path, **opts)

    def compute_reference(self, engine) -> None:
        """Undisturbed tokens of every (prompt, kind) at the longest length; shorter requests are prefixes
        (greedy, and seeded sampling whose draws depend only on the seed and the token index)."""
        for kind, extra in (("greedy", dict(temperature=0.0)), ("seeded", SEEDED)):
            sp = dict(max_new_tokens=MAX_TOKENS, ignore_eos=True, **extra)
            outs = engine.generate(PROMPTS, sp, use_tqdm=False)
            for p, o in zip(PROMPTS, outs):
                self.reference[(p, kind)] = o["token_ids"]

    def check_tokens(self, prompt: str, kind: str, n: int, tokens: list[int], streamed: list[int] | None) -> None:
        want = self.reference[(prompt, kind)][:n]
        if streamed is not None and streamed != tokens:
            self.tally.add("duplicated_or_missing")
            self.tally.error("stream_mismatch", f"{prompt!r}: streamed {streamed} vs result {tokens}")
        elif tokens != want:
            self.tally.add("wrong")
            self.tally.error("wrong_tokens", f"{prompt!r} {kind}: {tokens} vs {want}")
        else:
            self.tally.add("completed")

    # -------------------------------------------------------------------------------------- clients
    def python_client(self, engine, seed: int) -> None:
        rng = random.Random(seed)
        bad = _bad_inputs(engine.vocab_size)
        while not self.stop.is_set():
            r = rng.random()
            prompt = rng.choice(PROMPTS)
            sp, kind = _params(rng)
            try:
                if r < 0.1:
                    field_name, kwargs = rng.choice(bad)
                    self.tally.add("bad_inputs")
                    try:
                        engine.generate(use_tqdm=False, **kwargs)
                        self.tally.error("bad_input_accepted", str(kwargs))
                    except ValueError as e:
                        if field_name not in str(e):
                            self.tally.error("unclear_error", f"{field_name}: {e}")
                        else:
                            self.tally.add("bad_inputs_refused")
                elif r < 0.2:  # a client that leaves early
                    self.tally.add("requests")
                    it = engine.stream(prompt, SamplingParams(**sp))
                    next(it)
                    it.close()
                    self.tally.add("left_early")
                elif r < 0.6:
                    self.tally.add("requests")
                    deltas = list(engine.stream(prompt, SamplingParams(**sp)))
                    final = deltas[-1]["result"]
                    streamed = [t for d in deltas for t in d["token_ids"]]
                    self.check_tokens(prompt, kind, sp["max_new_tokens"], final["token_ids"], streamed)
                else:
                    self.tally.add("requests")
                    out = engine.generate([prompt], sp, use_tqdm=False)[0]
                    self.check_tokens(prompt, kind, sp["max_new_tokens"], out["token_ids"], None)
            except Exception as e:  # a good request that did not complete
                self.tally.add("failed")
                self.tally.error(type(e).__name__, str(e))

    def http_client(self, base: str, seed: int) -> None:
        import httpx

        rng = random.Random(seed)
        with httpx.Client(base_url=base, timeout=180.0) as http:
            while not self.stop.is_set():
                prompt = rng.choice(PROMPTS)
                sp, kind = _params(rng)
                body = {"model": "soak", "prompt": prompt, "max_tokens": sp["max_new_tokens"],
                        "temperature": sp["temperature"], "ignore_eos": True}
                if kind == "seeded":
                    body.update(top_k=SEEDED["top_k"], seed=SEEDED["seed"])
                try:
                    r = rng.random()
                    if r < 0.1:
                        self.tally.add("bad_inputs")
                        resp = http.post("/v1/completions", json={**body, "max_tokens": -1})
                        err = resp.json().get("error", {}) if resp.headers.get("content-type", "").startswith(
                            "application/json") else {}
                        said = str(err.get("message", "")) + str(err.get("param"))
                        if resp.status_code == 400 and "max_tokens" in said:
                            self.tally.add("bad_inputs_refused")
                        else:
                            self.tally.error("unclear_http_error", f"{resp.status_code} {resp.text[:200]}")
                        continue
                    self.tally.add("requests")
                    if r < 0.55:
                        resp = http.post("/v1/completions", json=body)
                        if resp.status_code != 200:
                            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                        text = resp.json()["choices"][0]["text"]
                        self.check_text(prompt, kind, sp["max_new_tokens"], text)
                    else:
                        leave = rng.random() < 0.2
                        chunks, done = [], False
                        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                            for line in resp.iter_lines():
                                if not line.startswith("data: "):
                                    continue
                                if line == "data: [DONE]":
                                    done = True
                                    break
                                obj = json.loads(line[6:])
                                if "error" in obj:
                                    raise RuntimeError(f"stream error: {obj['error']}")
                                chunks.append(obj["choices"][0]["text"] if obj.get("choices") else "")
                                if leave and len(chunks) >= 2:
                                    break
                        if leave:
                            self.tally.add("left_early")
                        elif not done:
                            self.tally.add("cut_streams")
                            self.tally.error("cut_stream", prompt)
                        else:
                            self.check_text(prompt, kind, sp["max_new_tokens"], "".join(chunks))
                except Exception as e:
                    self.tally.add("failed")
                    self.tally.error(f"http_{type(e).__name__}", str(e))

    def check_text(self, prompt: str, kind: str, n: int, text: str) -> None:
        want = self.tokenizer.decode(self.reference[(prompt, kind)][:n], skip_special_tokens=True)
        if text != want:
            self.tally.add("wrong")
            self.tally.error("wrong_text", f"{prompt!r} {kind}: {text!r} vs {want!r}")
        else:
            self.tally.add("completed")

    # -------------------------------------------------------------------------------------- faults
    def inject(self, engine, base: str | None) -> None:
        rng = random.Random(self.args.seed + 1)
        budgeted = self.args.restart_budget == "default"
        # faults that take replicas down; under the engine's own budget only one that leaves another serving
        process_faults = {"kill_one", "kill_both", "kill_staggered", "sigstop_one", "sigstop_cont_short",
                          "sigstop_cont_long"}
        faults = ["kill_one", "kill_both", "kill_staggered", "sigstop_one", "sigstop_cont_short",
                  "sigstop_cont_long", "scale", "update_weights", "pause", "garbage", "join_bad_address"]
        if budgeted:  # every replica at once is left to the unlimited runs; a same-size scale restarts a spent group
            faults = [f for f in faults if f not in ("kill_both", "kill_staggered")] + ["scale_same"]
        if base is not None:
            faults += ["http_update_from_disk", "http_join_bad_address", "http_pause"]
        state = None
        while not self.stop.wait(self.args.fault_every_s):
            ready = engine.serving if budgeted else engine.healthy
            if not self._wait_for(ready, 120):
                self.tally.error("not_healthy", "the engine did not come back within 120 s")
                continue
            kind = rng.choice(faults)
            pids = [r["pids"] for r in engine.stats()["replicas"] if r["alive"]]
            if budgeted and kind in process_faults and len(pids) < 2:
                self.tally.add("faults_skipped")  # the only live replica: its loss would leave none serving
                continue
            self.tally.fault(kind)
            try:
                if kind == "kill_one":
                    for pid in rng.choice(pids):
                        os.kill(pid, signal.SIGKILL)
                elif kind == "kill_both":
                    for pid in (p for group in pids for p in group):
                        os.kill(pid, signal.SIGKILL)
                elif kind == "kill_staggered":  # a rolling failure: A dies, then B, which took A's requests
                    first = rng.choice(pids)
                    for pid in first:
                        os.kill(pid, signal.SIGKILL)
                    time.sleep(rng.uniform(1.0, 3.0))
                    others = [g for g in (r["pids"] for r in engine.stats()["replicas"] if r["alive"])
                              if not set(g) & set(first)]
                    for pid in (rng.choice(others) if others else []):
                        _signal(pid, signal.SIGKILL)
                elif kind == "sigstop_one":
                    victim = rng.choice(pids)
                    for pid in victim:
                        os.kill(pid, signal.SIGSTOP)  # silent: the fleet must notice, kill and restart it
                elif kind in ("sigstop_cont_short", "sigstop_cont_long"):
                    # frozen for half the heartbeat timeout (must be waited out) or 1.5 of it (declared dead,
                    # killed and restarted; the SIGCONT then finds it gone or wakes a process being replaced)
                    victim = rng.choice(pids)
                    for pid in victim:
                        os.kill(pid, signal.SIGSTOP)
                    time.sleep(self.args.heartbeat_timeout_s * (0.5 if kind == "sigstop_cont_short" else 1.5))
                    for pid in victim:
                        _signal(pid, signal.SIGCONT)
                elif kind == "join_bad_address":  # a trainer's typo: must fail fast and name the address
                    try:
                        world = 1 + len(engine.weight_sync_ranks(1))
                        engine.init_weights_update_group("127.0.0.1", _closed_port(), 1, world, "soak", "gloo",
                                                         connect_timeout_s=2.0)
                        self.tally.error("fault_join_bad_address", "a join with no master succeeded")
                    except RuntimeError as e:
                        self.judge_join_refusal(kind, str(e))
                elif kind == "scale":
                    engine.scale(3)
                    engine.scale(2, drain_timeout_s=rng.choice([0.0, 5.0]))
                elif kind == "scale_same":  # an operator's way to bring back a group whose budget is spent
                    engine.scale(engine.stats()["dp_size"])
                elif kind.startswith("http_"):
                    self.http_fault(kind, base, engine)
                elif kind == "update_weights":
                    if state is None:
                        from safetensors.torch import load_file

                        state = {}
                        for f in sorted(os.listdir(self.path)):
                            if f.endswith(".safetensors"):
                                state.update(load_file(os.path.join(self.path, f)))
                    engine.update_weights(state)  # the same values: tokens stay comparable
                elif kind == "pause":
                    engine.pause()
                    time.sleep(0.5)
                    engine.resume()
                elif kind == "garbage":
                    import zmq

                    sock: Any = zmq.Context.instance().socket(zmq.PUSH)
                    sock.connect(engine._out_addr)
                    for frame in (b"\xff\xfe", b"", os.urandom(64)):
                        sock.send(frame)
                    sock.close(linger=500)
            except Exception as e:
                self.tally.error(f"fault_{kind}", f"{type(e).__name__}: {e}")

    def judge_join_refusal(self, kind: str, message: str) -> None:
        """A join at a closed port must fail naming the address; while a group is down (its restart budget spent)
        the engine refuses any join up front, naming the group, which is as clear (counted apart)."""
        if "master_address" in message:
            return
        if "is down; retry once every replica" in message:
            self.tally.add("joins_refused_degraded")
        else:
            self.tally.error("unclear_error", f"{kind}: {message}")

    def http_fault(self, kind: str, base: str, engine) -> None:
        """The RL routes under load, as a trainer drives them: each must answer 200, or for the bad join a
        failure that names the address, while the clients' requests go on."""
        import httpx

        with httpx.Client(base_url=base, timeout=120.0) as http:
            if kind == "http_update_from_disk":  # the checkpoint the engine serves: tokens stay comparable
                calls = [("/update_weights_from_disk", {"model_path": self.path})]
            elif kind == "http_pause":
                calls = [("/pause_generation", {"mode": "in_place"}), ("/continue_generation", {})]
            else:
                try:
                    world = 1 + len(engine.weight_sync_ranks(1))
                except RuntimeError as e:  # a group is down: the route would refuse the same way
                    self.judge_join_refusal(kind, str(e))
                    return
                body = {"master_address": "127.0.0.1", "master_port": _closed_port(), "rank_offset": 1,
                        "world_size": world, "group_name": "soak-http", "backend": "gloo", "connect_timeout_s": 2.0}
                resp = http.post("/init_weights_update_group", json=body)
                if resp.status_code == 200 and resp.json().get("success", True):
                    self.tally.error("fault_join_bad_address", f"an HTTP join with no master succeeded: {resp.text}")
                elif resp.status_code == 200 or resp.status_code >= 500:
                    self.tally.error("unclear_error", f"{kind}: HTTP {resp.status_code} {resp.text[:200]}")
                else:
                    self.judge_join_refusal(kind, resp.text)
                return
            for path, body in calls:
                resp = http.post(path, json=body)
                if resp.status_code != 200 or not resp.json().get("success", True):
                    raise RuntimeError(f"{path}: HTTP {resp.status_code} {resp.text[:200]}")

    @staticmethod
    def _wait_for(ready, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    # -------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        me = psutil.Process()
        engine = self.make_engine()
        self.tokenizer = engine.tokenizer
        private_dir = engine._private_dir
        worker_pids: set[int] = set()
        server = None
        try:
            self.compute_reference(engine)
            if self.args.http_clients:
                from flotilla.server.app import build_app
                from flotilla.server.launch import ServerThread

                server = ServerThread(build_app(engine, "soak")).start()
            time.sleep(0.5)
            rss0, fds0 = me.memory_info().rss, me.num_fds()
            threads = [threading.Thread(target=self.python_client, args=(engine, self.args.seed * 100 + i), daemon=True)
                       for i in range(self.args.python_clients)]
            threads += [threading.Thread(target=self.http_client, args=(server.url, self.args.seed * 1000 + i),
                                         daemon=True) for i in range(self.args.http_clients)]
            threads.append(threading.Thread(target=self.inject, args=(engine, server.url if server else None),
                                            daemon=True))
            for t in threads:
                t.start()
            deadline = time.monotonic() + self.args.seconds
            degraded_s = 0.0
            while time.monotonic() < deadline:
                for r in engine.stats()["replicas"]:
                    worker_pids.update(r["pids"])
                if not engine.healthy():
                    degraded_s += 0.5
                time.sleep(0.5)
            self.stop.set()
            for t in threads:
                t.join(timeout=240)
            hung = sum(t.is_alive() for t in threads)
            if hung:
                self.tally.add("lost", hung)  # a client thread still waiting: its request never ended
            # every group back: under the default budget a spent group returns when its window refills, or now
            self._wait_for(engine.healthy, 15) or engine.scale(engine.stats()["dp_size"])
            self._wait_for(engine.healthy, 120)
            restarts = engine.stats()["replica_restarts"]
            for r in engine.stats()["replicas"]:
                worker_pids.update(r["pids"])
            rss1, fds1 = me.memory_info().rss, me.num_fds()
        finally:
            if server is not None:
                server.stop()
            engine.shutdown()
        time.sleep(1.0)
        leaked_pids = sorted(p for p in worker_pids if psutil.pid_exists(p) and
                             psutil.Process(p).status() != psutil.STATUS_ZOMBIE)
        leaks = {"worker_processes": leaked_pids, "private_dir": os.path.exists(private_dir)}
        if self.args.launcher == "ray":
            import ray
            from ray.util import placement_group_table

            leaks["placement_groups"] = [k for k, v in placement_group_table().items() if v["state"] != "REMOVED"]
            ray.shutdown()
        c = self.tally.counts
        report = {"launcher": self.args.launcher, "seconds": self.args.seconds, "seed": self.args.seed,
                  "requests": c["requests"], "faults": dict(self.tally.faults),
                  "faults_injected": sum(self.tally.faults.values()), "completed": c["completed"],
                  "left_early": c["left_early"], "failed": c["failed"], "lost": c["lost"] + c["cut_streams"],
                  "duplicated_tokens": c["duplicated_or_missing"], "wrong": c["wrong"],
                  "bad_inputs": c["bad_inputs"], "bad_inputs_refused": c["bad_inputs_refused"],
                  "errors": dict(self.tally.errors), "examples": self.tally.examples,
                  "restart_budget": self.args.restart_budget, "replica_restarts": restarts,
                  "degraded_s": degraded_s, "faults_skipped": c["faults_skipped"],
                  "joins_refused_degraded": c["joins_refused_degraded"],
                  "rss0_mb": round(rss0 / 2**20, 1), "rss1_mb": round(rss1 / 2**20, 1), "fds0": fds0, "fds1": fds1,
                  "rss_growth_mb": round((rss1 - rss0) / 2**20, 1), "fd_growth": fds1 - fds0, "leaks": leaks}
        bounded = report["rss_growth_mb"] < self.args.max_rss_growth_mb and report["fd_growth"] < 64
        report["ok"] = (report["lost"] == 0 and report["failed"] == 0 and report["duplicated_tokens"] == 0 and
                        report["wrong"] == 0 and not STRICT_ERRORS & report["errors"].keys() and
                        report["bad_inputs"] == report["bad_inputs_refused"] and bounded and not leaked_pids and
                        not leaks["private_dir"] and not leaks.get("placement_groups"))
        return report


def print_table(report: dict[str, Any]) -> None:
    rows = [("launcher", report["launcher"]), ("seconds", report["seconds"]), ("requests", report["requests"]),
            ("faults injected", f"{report['faults_injected']} {report['faults']}"),
            ("restart budget", report["restart_budget"]), ("replica restarts", report["replica_restarts"]),
            ("degraded (s)", report["degraded_s"]), ("faults skipped (no spare replica)", report["faults_skipped"]),
            ("joins refused (a group down)", report["joins_refused_degraded"]),
            ("completed (tokens checked)", report["completed"]), ("left early", report["left_early"]),
            ("failed with an error", report["failed"]), ("lost", report["lost"]),
            ("duplicated/missing tokens", report["duplicated_tokens"]), ("wrong tokens", report["wrong"]),
            ("bad inputs refused", f"{report['bad_inputs_refused']}/{report['bad_inputs']}"),
            ("errors by kind", report["errors"] or "-"),
            ("rss (MB) before -> after", f"{report['rss0_mb']} -> {report['rss1_mb']}"),
            ("fds before -> after", f"{report['fds0']} -> {report['fds1']}"),
            ("leaks after shutdown", report["leaks"]), ("ok", report["ok"])]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def add_soak_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=60.0, help="how long traffic and faults run")
    p.add_argument("--launcher", choices=["mp", "ray"], default="mp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--python-clients", type=int, default=4)
    p.add_argument("--http-clients", type=int, default=2)
    p.add_argument("--fault-every-s", type=float, default=4.0, help="pause between faults (after health returns)")
    p.add_argument("--heartbeat-timeout-s", type=float, default=4.0)
    p.add_argument("--restart-budget", choices=["unlimited", "default"], default="unlimited",
                   help="unlimited restarts (every fault, at any rate), or the engine's own max_replica_restarts "
                        "per restart_window_s with backoff (faults never take the last serving replica)")
    p.add_argument("--max-rss-growth-mb", type=float, default=300.0)
    p.add_argument("--overlap-schedule", action=argparse.BooleanOptionalAction, default=True,
                   help="the replicas plan step N+1 while N runs (the engine's default)")
    p.add_argument("--json", default=None, help="write the report here")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flotilla soak", description=__doc__.split("\n\n")[0])
    add_soak_args(p)
    return run_soak(p.parse_args(argv))


def run_soak(args: argparse.Namespace) -> int:
    report = Soak(args).run()
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
