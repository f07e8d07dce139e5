"""`flotilla bench` on CPU (both backends), its workloads, the built-in shapes, and the CUDA-only modules'
import safety. The GPU figures themselves come from scripts/device_run.sh (docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from flotilla.tools.bench import nanovllm_workload, random_workload, sglang_random_workload
from flotilla.cli import main as cli_main


# ------------------------------------------------------------------------------------------------ workloads
def test_nanovllm_workload_matches_nano_vllm() -> None:
    wl = nanovllm_workload(151936)
    assert len(wl.prompts) == 256 and wl.temperature == 0.6
    assert wl.input_tokens == 142_827 and wl.output_tokens == 133_966
    assert all(100 <= len(p) <= 1024 for p in wl.prompts) and all(100 <= n <= 1024 for n in wl.output_lens)
    assert max(max(p) for p in wl.prompts) <= 10000
    small = nanovllm_workload(512)  # ids wrap into a small vocabulary without changing the draws
    assert small.output_lens == wl.output_lens and max(max(p) for p in small.prompts) < 512


def test_sglang_random_workload_matches_sglang() -> None:
    wl = sglang_random_workload(128256)
    assert len(wl.prompts) == 1000 and wl.temperature == 0.0 and wl.enable_prefix_caching is False
    assert wl.input_tokens == 512_842 and wl.output_tokens == 510_855
    p = wl.prompts[3]
    assert all((b - a) % 128256 == 1 for a, b in zip(p, p[1:]))  # consecutive ids from a random offset
    assert len(wl.warmup) == 16 and all(len(ids) == 256 and n == 16 for ids, n in wl.warmup)


def test_random_workload_shape() -> None:
    wl = random_workload(512, num_prompts=3, input_len=7, output_len=5, seed=1, warmup=0)
    assert [len(p) for p in wl.prompts] == [7, 7, 7] and wl.output_lens == [5, 5, 5] and wl.warmup == []
    assert wl.prompts == random_workload(512, 3, 7, 5, seed=1, warmup=0).prompts


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("backend", ["flotilla", "transformers"])
def test_bench_cli_tiny_model(backend: str, llama_path: str, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    rc = cli_main(["bench", "--model", llama_path, "--backend", backend, "--device", "cpu", "--workload", "random",
                   "--num-prompts", "4", "--input-len", "12", "--output-len", "6", "--warmup-requests", "1",
                   "--cuda-graph-max-bs", "32", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "output tokens/s" in printed and "TTFT ms" in printed and "TPOT ms" in printed
    r = json.loads(out.read_text())
    assert r["backend"] == backend and r["workload"] == "random" and r["num_requests"] == 4
    assert r["total_input_tokens"] == 48 and r["total_output_tokens"] == 24 == r["expected_output_tokens"]
    assert r["output_throughput"] > 0 and r["request_throughput"] > 0 and r["duration_s"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        assert set(r[key]) == {"mean", "p50", "p90", "p99"} and r[key]["p50"] >= 0
    if backend == "flotilla":
        assert r["engine_config"]["cuda_graph_max_bs"] == 32


def test_frontend_bench_streams_every_token(tmp_path) -> None:
    """scripts/frontend_bench.py (docs/benchmarks.md §9): every replayed token reaches its stream."""
    out = tmp_path / "fe.json"
    root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "scripts" / "frontend_bench.py"), "--requests", "8", "--steps", "5",
                    "--repeat", "1", "--json", str(out)], check=True, timeout=120, cwd=root,
                   env={**os.environ, "PYTHONPATH": str(root)})
    r = json.loads(out.read_text())["median"]
    assert r["tokens"] == 8 * 5 and r["tokens_per_s"] > 0


def test_bench_cli_rejects_bad_arguments(llama_path: str) -> None:
    with pytest.raises(SystemExit):
        cli_main(["bench", "--model", llama_path, "--device", "cpu", "--workload", "random", "--num-prompts", "2"])
    with pytest.raises(SystemExit):
        cli_main(["bench", "--model-shape", "qwen3-0.6b", "--load-format", "safetensors"])
    with pytest.raises(ValueError, match="model_shape"):
        cli_main(["bench", "--model-shape", "gpt-17", "--device", "cpu"])


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", ["qwen3-0.6b", "llama-3.1-8b", "qwen3-30b-a3b"])
def test_shapes_resolve(name: str, tmp_path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from flotilla.config import EngineConfig
    from flotilla.model.shapes import shape_config, write_shape

    path = write_shape(name, tmp_path / name)
    cfg = EngineConfig(model=str(path), load_format="dummy", device="cpu").resolve()
    assert cfg.hf_config["vocab_size"] == shape_config(name)["vocab_size"]
    hf = AutoConfig.from_pretrained(path)
    assert hf.num_hidden_layers == shape_config(name)["num_hidden_layers"]
    assert len(AutoTokenizer.from_pretrained(path)) == 512  # the small stand-in tokenizer


def test_roofline_bytes() -> None:
    from flotilla.model.shapes import kv_bytes, shape_config, weight_bytes

    llama = shape_config("llama-3.1-8b")
    assert weight_bytes(llama) == 15_009_849_344  # every weight but the embedding table, bf16
    assert kv_bytes(llama, 1024) == 134_217_728
    qwen = shape_config("qwen3-0.6b")  # tied: the LM head is the table, counted once
    assert weight_bytes(qwen, include_embedding=True) == weight_bytes(qwen)
    with pytest.raises(ValueError):
        weight_bytes(shape_config("qwen3-30b-a3b"))


# ------------------------------------------------------------------------------------------------ CUDA-only code
def test_cuda_modules_import_on_cpu() -> None:
    from flotilla.model.attention import TorchAttention, make_backend
    from flotilla.model.attention import triton_backend as tb
    from flotilla.model.layers import fused
    from flotilla.worker import cuda_graph

    assert isinstance(make_backend("auto", "cpu"), TorchAttention)
    assert isinstance(make_backend("torch", "cpu"), TorchAttention)
    with pytest.raises(ValueError, match="attention_backend"):
        make_backend("triton", "cpu")
    x = torch.randn(3, 8)
    assert not fused.use_fused(x)  # CPU tensors always take the torch reference
    assert tb.TritonAttention.graph_safe and cuda_graph.graph_batch_sizes(1) == [1]


def test_graph_ladder_keeps_decode_splits() -> None:
    """A batch and the graph bucket it replays in must split the decode attention the same way, or graph and
    eager outputs would differ."""
    from flotilla.model.attention.triton_backend import decode_splits
    from flotilla.worker.cuda_graph import graph_batch_sizes

    for max_bs in (1, 7, 100, 256, 512):
        ladder = graph_batch_sizes(max_bs)
        assert ladder == sorted(set(ladder)) and ladder[-1] == max_bs
        for n in range(1, max_bs + 1):
            bucket = next(b for b in ladder if b >= n)
            for kv_heads in (1, 2, 4, 8):
                assert decode_splits(n, kv_heads) == decode_splits(bucket, kv_heads), (max_bs, n, kv_heads)


def test_mixed_attention_mode_is_checked() -> None:
    """The mixed-batch mode of the Triton backend (split by default, unified as the measured reference)."""
    from flotilla.model.attention.triton_backend import mixed_mode

    assert mixed_mode(None, {}) == "split"
    assert mixed_mode(None, {"FLOTILLA_ATTENTION_MIXED": "unified"}) == "unified"
    assert mixed_mode("split", {"FLOTILLA_ATTENTION_MIXED": "unified"}) == "split"
    with pytest.raises(ValueError, match="FLOTILLA_ATTENTION_MIXED.*'fast'.*split, unified"):
        mixed_mode(None, {"FLOTILLA_ATTENTION_MIXED": "fast"})


def test_cpu_forward_unchanged_by_fused_hooks(llama_path: str) -> None:
    """The model's CPU path (the reference) never calls into the Triton hooks."""
    from flotilla.frontend.engine import Engine

    with Engine(model=llama_path, device="cpu", dtype="float32") as eng:
        out = eng.generate(input_ids=[[5, 6, 7, 8]], sampling_params={"max_new_tokens": 4, "temperature": 0.0},
                           use_tqdm=False)
    from conftest import hf_greedy

    assert out[0]["token_ids"] == hf_greedy(llama_path, [5, 6, 7, 8], 4)


def test_triton_kernels_in_interpreter() -> None:
    """The Triton kernels against the torch reference under TRITON_INTERPRET=1 (where Triton is installed)."""
    pytest.importorskip("triton")
    code = ("import sys, torch; sys.path.insert(0, 'scripts'); import gpu_check; "
            "gpu_check.check_attention('cpu', torch.float32, verbose=False); gpu_check.check_fused('cpu', torch.float32)")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    if proc.returncode and "only 0-dimensional arrays" in proc.stderr:
        pytest.skip("this Triton's interpreter does not run under this numpy")
    assert proc.returncode == 0, proc.stderr[-3000:]
