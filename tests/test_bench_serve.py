"""``flotilla bench-serve`` on CPU: the figures it writes, and that no stream is cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny
from flotilla.tools.bench_serve import make_specs
from flotilla.cli import main

PCT_KEYS = {"mean", "p50", "p90", "p99"}


def _check(serve: dict, n: int, output_len: int) -> None:
    assert serve["num_requests"] == n and serve["completed"] == n
    assert serve["cut"] == 0 and serve["errors"] == 0, serve["error_samples"]
    assert serve["output_tokens"] == n * output_len
    assert serve["output_throughput"] > 0
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        assert set(serve[key]) == PCT_KEYS
    assert serve["ttft_ms"]["p50"] <= serve["e2e_ms"]["p50"]


def test_bench_serve_starts_a_server_and_runs_offline_too(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    rc = main(["bench-serve", "--model", tiny("llama"), "--device", "cpu", "--dtype", "float32", "-n", "12",
               "--concurrency", "4", "--input-len", "8", "--output-len", "6", "--random-range-ratio", "0",
               "--warmup", "2", "--offline", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    _check(r["serve"], 12, 6)
    assert r["offline"]["total_output_tokens"] == 12 * 6
    assert r["serve_over_offline"] > 0
    assert r["serve"]["server_us_per_token"]["process"] > 0


def test_bench_serve_synthetic_engine_text_and_sampled_lengths(tmp_path: Path) -> None:
    out = tmp_path / "synthetic.json"
    rc = main(["bench-serve", "--synthetic", "--synthetic-step-ms", "1", "-n", "40", "--concurrency", "16",
               "--dataset", "random-text", "--input-len", "20", "--output-len", "12", "--client-processes", "2",
               "--warmup", "0", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    _check(r["serve"], 40, 12)
    assert {"process", "http_thread", "engine_thread"} <= set(r["serve"]["server_us_per_token"])


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_bench_serve_against_a_running_server(tmp_path: Path, client: str) -> None:
    from flotilla.server import ServerThread, build_app
    from flotilla.server.synthetic import SyntheticEngine

    engine = SyntheticEngine.for_shape("qwen3-0.6b", step_ms=1.0)
    server = ServerThread(build_app(engine, "m", api_key="k")).start()
    try:
        for stream in ("--stream", "--no-stream"):
            out = tmp_path / f"{client}{stream}.json"
            assert main(["bench-serve", "--url", server.url, "--api-key", "k", "--client", client, stream,
                         "-n", "10", "--concurrency", "5", "--request-rate", "200", "--input-len", "8",
                         "--output-len", "5", "--max-token-id", "400", "--json", str(out)]) == 0
            _check(json.loads(out.read_text())["serve"], 10, 5)
    finally:
        server.stop()
        engine.shutdown()


def test_sampled_lengths_stay_in_range() -> None:
    specs = make_specs(200, 100, 50, ratio=0.5, dataset="random-ids", vocab=300, seed=1)
    assert {len(s.prompt) for s in specs} <= set(range(50, 151))
    assert {s.output_len for s in specs} <= set(range(25, 76))
    assert len({s.output_len for s in specs}) > 10
    assert all(0 <= t < 300 for s in specs for t in s.prompt)
    assert make_specs(3, 5, 7, dataset="random-ids", seed=1)[0].prompt == make_specs(3, 5, 7, seed=1)[0].prompt


def test_offline_twin_has_the_same_lengths_and_other_prompts() -> None:
    from flotilla.tools.bench_serve import twin_specs

    for dataset in ("random-ids", "random-text"):
        specs = make_specs(20, 30, 10, ratio=0.3, dataset=dataset, vocab=300, seed=2)
        twin = twin_specs(specs, 300, 99)
        assert [s.output_len for s in twin] == [s.output_len for s in specs]
        size = (lambda p: len(p)) if dataset == "random-ids" else (lambda p: len(p.split(" ")))
        assert [size(t.prompt) for t in twin] == [size(s.prompt) for s in specs]
        assert [t.prompt for t in twin] != [s.prompt for s in specs]


def test_parser_counts_chunks_with_empty_text_and_sees_the_end() -> None:
    from flotilla.tools.bench_serve import Outcome, _SSEParser

    out = Outcome()
    p = _SSEParser(out)
    frames = (b'data: {"choices":[{"index":0,"text":"","finish_reason":null}],"usage":null}\n\n'
              b'data: {"choices":[{"index":0,"text":"a","finish_reason":"length"}],"usage":null}\n\ndata: {"cho')
    p.feed(frames, 1.0)
    p.feed(b'ices":[],"usage":{"completion_tokens":2}}\n\ndata: [DONE]\n\n', 2.0)
    assert out.chunks == [1.0, 1.0] and out.finished and out.done and out.output_tokens == 2 and out.error is None
    cut = Outcome()
    _SSEParser(cut).feed(b'data: {"error":{"message":"replica died"}}\n\n', 1.0)
    assert cut.error == "replica died" and not cut.done
