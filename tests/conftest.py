"""Shared fixtures: tiny checkpoints (built once, cached on disk) and transformers' greedy tokens on them."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "The capital of France is",
    "Hello",
    "Once upon a time there was a little fox who lived in a deep green forest near the river, and every "
    "morning it walked down to the water to drink and to watch the fish swim by in the cold clear current",
    "A",
]


def tiny(arch: str = "llama", **overrides) -> str:
    from flotilla.tools.tiny import tiny_model_path

    return str(tiny_model_path(arch, **overrides))


@functools.lru_cache(maxsize=None)
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy tokens (eos ignored, so every comparison has max_new_tokens tokens). Computed once
    per (checkpoint, prompt, length) in a session: many modules compare against the same references."""
    return list(_hf_greedy(path, tuple(prompt_ids), max_new_tokens))


@functools.lru_cache(maxsize=None)
def _hf_greedy(path: str, prompt_ids: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
    model = _hf_model(path)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=None, do_sample=False, eos_token_id=None, pad_token_id=0)
    return tuple(out[0, len(prompt_ids):].tolist())


@functools.lru_cache(maxsize=None)
def _hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def hf_tokenize(path: str, text: str) -> list[int]:
    return list(_hf_tokenizer(path)(text)["input_ids"])


@pytest.fixture(scope="session")
def llama_path() -> str:
    return tiny("llama")


@pytest.fixture(scope="session")
def llama_dp1_engine(llama_path: str):
    """One ``Engine(tiny llama, cpu, float32)`` (one replica) for test_edge_engine, test_engine_core and
    test_front_end_faults, whose tests leave it healthy and serving as they found it."""
    from flotilla.frontend.engine import Engine

    with Engine(model=llama_path, device="cpu", dtype="float32") as engine:
        yield engine


@pytest.fixture(scope="session")
def llama_dp2_engine(llama_path: str):
    """One ``Engine(tiny llama, dp_size=2, cpu, float32)`` for every module whose tests take that engine as it is
    (test_choices, test_parallel, test_server*, test_structured): started once a session instead of once a module.
    Tests on it leave it as they found it (two replicas, not paused) and compare counters before and after, never
    absolutely."""
    from flotilla.frontend.engine import Engine

    with Engine(model=llama_path, device="cpu", dtype="float32", dp_size=2) as engine:
        yield engine


# ============================================================================ unit / end-to-end split
# `make test-unit` (`pytest -m "not e2e"`) runs the unit tests: fakes, no processes, no engines. Every other test
# is marked `e2e` here, by module, so test files need no marker of their own (and edits to them merge cleanly).
# A new module is end-to-end until it is listed in UNIT_MODULES; a test in a unit module that starts processes
# anyway goes in E2E_TESTS. Under `-m "not e2e"` a unit test that starts a process is named at the end of the
# run (see _ProcessWatch below), so the lists can be kept honest.
UNIT_MODULES = {
    "test_bench", "test_bench_serve", "test_channel", "test_detokenizer", "test_docs_ray", "test_edge_bounds",
    "test_fleet", "test_kv_cache", "test_moe_kernels", "test_policies", "test_rl_rank_side", "test_rl_routes",
    "test_rl_sync_plane", "test_sampler", "test_server_cli", "test_server_encoding", "test_server_robustness",
    "test_server_structured", "test_tiny", "test_dispatcher", "test_outward_contract", "test_weights", "test_lora_http", "test_lora_ray",
    "test_lora_units", "test_replica_texts", "test_stream_interval",
}
E2E_TESTS = {
    "test_bench.py::test_bench_cli_tiny_model",
    "test_weights.py::test_a_file_update_that_fails_mid_way_on_one_rank_leaves_the_old_weights_everywhere",
    "test_bench.py::test_cpu_forward_unchanged_by_fused_hooks",
    "test_bench.py::test_frontend_bench_streams_every_token",
    "test_bench.py::test_triton_kernels_in_interpreter",
    "test_bench_serve.py::test_bench_serve_starts_a_server_and_runs_offline_too",
    "test_lora_units.py::test_the_triton_kernels_equal_the_reference_in_the_interpreter",
    "test_bench_serve.py::test_bench_serve_synthetic_engine_text_and_sampled_lengths",
    "test_bench_serve.py::test_bench_serve_against_a_running_server",
    "test_channel.py::test_ipc_round_trip_between_processes",
    "test_channel.py::test_tcp_curve_round_trip_between_processes",
    "test_edge_bounds.py::test_a_stopped_worker_dies_with_its_front_end",
    "test_rl_routes.py::test_routes_against_an_engine",
    "test_replica_texts.py::test_an_engine_detokenizing_in_its_front_end_gives_the_same_texts",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        name = f"{item.path.name}::{item.originalname if isinstance(item, pytest.Function) else item.name}"
        if module not in UNIT_MODULES or name in E2E_TESTS:
            item.add_marker(pytest.mark.e2e)


class _ProcessWatch:
    """Names unit tests (not marked e2e) that start a process: subprocess or multiprocessing, at the end of a run."""

    def __init__(self) -> None:
        import multiprocessing.process
        import subprocess

        self.current: pytest.Item | None = None
        self.offenders: dict[str, str] = {}
        watch = self
        popen_exec, mp_start = subprocess.Popen._execute_child, multiprocessing.process.BaseProcess.start  # type: ignore[attr-defined]

        def _execute_child(popen, args, *rest, **kw):
            watch.saw(f"subprocess {str(args)[:80]}")
            return popen_exec(popen, args, *rest, **kw)

        def start(proc):
            watch.saw(f"multiprocessing {proc.name}")
            return mp_start(proc)

        subprocess.Popen._execute_child = _execute_child  # type: ignore[attr-defined]
        multiprocessing.process.BaseProcess.start = start  # type: ignore[method-assign]

    def saw(self, what: str) -> None:
        item = self.current
        if item is not None and item.get_closest_marker("e2e") is None:
            self.offenders.setdefault(item.nodeid, what)


_WATCH: _ProcessWatch | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _WATCH
    if "not e2e" in (session.config.option.markexpr or ""):
        _WATCH = _ProcessWatch()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if _WATCH is not None:
        _WATCH.current = item
    yield
    if _WATCH is not None:
        _WATCH.current = None


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _WATCH is not None and _WATCH.offenders:
        terminalreporter.section("unit tests that started processes (mark them e2e in tests/conftest.py)")
        for nodeid, what in _WATCH.offenders.items():
            terminalreporter.line(f"{nodeid}: {what}")


def start_cli_serve(llama_path: str, *extra: str, key: str = "cli-key"):
    """``flotilla serve`` on the tiny llama at port 0 (served as "cli-model", the API key in the environment), in a
    process of its own: (the process, its URL once it printed the "serving" line). The caller ends the process."""
    import re
    import subprocess
    import sys

    env = {**os.environ, "FLOTILLA_API_KEY": key}
    proc = subprocess.Popen([sys.executable, "-m", "flotilla", "serve", "--model", llama_path, "--device", "cpu",
                             "--dtype", "float32", "--port", "0", "--served-model-name", "cli-model",
                             "--log-level", "warning", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stdout:  # type: ignore[union-attr]
        m = re.match(r"flotilla: serving cli-model on (http://127\.0\.0\.1:\d+)", line)
        if m:
            return proc, m.group(1)
    proc.wait()
    return proc, None
