"""The front end's own ceiling: how many streamed tokens per second it absorbs with no model behind it.

Every token a replica produces passes through one front-end thread (msgspec decode, DPController.on_step,
incremental detokenization, stop strings) and then wakes an asyncio consumer that cuts a delta from the
request (what ``flotilla bench`` and the HTTP server do). This replays ``--steps`` steps of ``--requests``
requests (one token each, as decode steps deliver them) through exactly those pieces, from a thread, while
``--requests`` asyncio streams consume them, and reports tokens/s. No worker, GPU or sockets are involved, so
the figure is what the front end alone allows, to set beside engine throughput.

    python3 scripts/frontend_bench.py --requests 256 --steps 400 --json frontend.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import threading
import time


def run(requests: int, steps: int, seed: int = 0) -> dict:
    from transformers import AutoTokenizer

    from flotilla.frontend import request as request_mod
    from flotilla.frontend.detokenizer import IncrementalDetokenizer
    from flotilla.ipc.messages import ReplicaLoad, StepOutput, TokenOutput, encoder, from_worker_decoder
    from flotilla.model.shapes import write_shape
    from flotilla.router.controller import DPController
    from flotilla.router.dispatch import Dispatcher
    from flotilla.sampling import SamplingParams

    folder = write_shape("qwen3-0.6b")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rng = random.Random(seed)
    vocab = len(tok)
    dispatcher = Dispatcher(DPController("round_robin"))
    dispatcher.replica_up(0, lambda msg, timeout_ms=0: None)
    states = []
    for i in range(requests):
        ids = [rng.randrange(vocab) for _ in range(128)]
        sp = SamplingParams(max_new_tokens=steps, ignore_eos=True)
        states.append(request_mod.RequestState(f"r{i}", ids, sp, IncrementalDetokenizer(tok, ids)))
    # the wire bytes of every step, made up front so the timed part is only the front end's work
    wire = [encoder.encode(StepOutput(0, [TokenOutput(s.rid, [rng.randrange(vocab)], finished=k == steps - 1,
                                                      finish_reason="length" if k == steps - 1 else None)
                                          for s in states], ReplicaLoad(running=requests)))
            for k in range(steps)]
    wake_all = getattr(request_mod, "wake_all", None)  # absent in trees before the batched wake-ups, which
    # this script also measures (docs/benchmarks.md §9 runs it on the previous commit's flotilla/)

    def replay() -> None:
        for raw in wire:
            woken = dispatcher.on_step(from_worker_decoder.decode(raw))
            if wake_all is not None:
                wake_all(woken)
            else:
                for st in woken:
                    st.wake()

    async def consume(state) -> int:
        ev = state.add_async_waiter()
        cursor, n = request_mod.StreamCursor(), 0
        while True:
            await ev.wait()
            ev.clear()
            delta = cursor.take(state)
            if delta is not None:
                n += len(delta["token_ids"])
                if delta["finished"]:
                    return n

    async def main() -> tuple[int, float]:
        tasks = [asyncio.ensure_future(consume(s)) for s in states]
        await asyncio.sleep(0)
        for s in states:
            dispatcher.submit(s)
        t0 = time.perf_counter()
        th = threading.Thread(target=replay)
        th.start()
        counts = await asyncio.gather(*tasks)
        dt = time.perf_counter() - t0
        th.join()
        return sum(counts), dt

    tokens, dt = asyncio.run(main())
    return {"requests": requests, "steps": steps, "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt,
            "us_per_token": dt / tokens * 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    runs = [run(a.requests, a.steps, seed) for seed in range(a.repeat)]
    runs.sort(key=lambda r: r["tokens_per_s"])
    median = runs[len(runs) // 2]
    print(f"front end: {median['tokens']} tokens from {a.requests} streams in {median['seconds']:.3f} s = "
          f"{median['tokens_per_s']:,.0f} tok/s ({median['us_per_token']:.2f} us/token; median of {a.repeat})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"median": median, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
