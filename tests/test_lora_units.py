"""LoRA's parts without processes: segments and the torch reference, the slot bookkeeping, the scheduler's slot
waits, per-adapter prefix-cache spaces, adapter config checks, config and sampling fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flotilla.config import EngineConfig
from flotilla.errors import InvalidParameter
from flotilla.lora.adapter import read_config
from flotilla.lora.kernels import BLOCK_M, apply_reference, max_blocks, segments
from flotilla.lora.slots import AdapterSlots
from flotilla.sampling import SamplingParams
from flotilla.worker.kv_cache import KVBlockManager
from flotilla.worker.scheduler import Scheduler, SchedulerConfig


def test_segments_group_rows_by_slot_in_blocks_and_leave_base_rows_out():
    slots = np.array([2, -1, 0, 2, 2, -1, 0] + [1] * 40)
    seg = segments(slots)
    assert sorted(seg.perm.tolist()) == [i for i, s in enumerate(slots) if s >= 0]
    assert all(0 < n <= BLOCK_M for n in seg.length)
    for s, start, n in zip(seg.slot, seg.start, seg.length):
        assert set(slots[seg.perm[start:start + n]]) == {s}  # one slot per block
    assert sum(seg.length) == seg.num_rows == 45
    assert len(seg.length) <= max_blocks(len(slots), 3)
    assert {s for s, _ in seg.groups} == {0, 1, 2}
    assert segments(np.full(5, -1)).num_rows == 0


def test_the_reference_equals_a_row_by_row_loop():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 6, generator=g), torch.randn(9, 5, generator=g)
    a, b = torch.randn(3, 4, 6, generator=g), torch.randn(3, 5, 4, generator=g)
    slots = np.array([0, -1, 2, 2, 1, -1, 0, 2, 1])
    groups = [(s, torch.from_numpy(r.astype(np.int64))) for s, r in segments(slots).groups]
    got = apply_reference(x, y.clone(), a, b, groups)
    want = y.clone()
    for t, s in enumerate(slots):
        if s >= 0:
            want[t] += b[s] @ (a[s] @ x[t])
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got[slots < 0], y[slots < 0])


def test_slots_are_held_while_used_and_reused_least_recently_idle_first():
    sl = AdapterSlots(2)
    for i, n in enumerate("abc"):
        sl.register(n, i + 1)
    sa = sl.acquire("a")
    sb = sl.acquire("b")
    assert (sa, sb) == (0, 1) and not sl.can_take("c")  # both slots in use
    assert sl.acquire("a") == sa and sl.slot_map() == ["a", "b"]
    sl.release(sa)
    assert not sl.can_take("c")  # "a" still has a user
    sl.release(sa)
    assert sl.can_take("c") and sl.can_take("a")
    assert sl.acquire("c") == sa  # the idle slot
    sl.release(sb)
    assert sl.acquire("a") == sb  # "a" lost its slot to "c", takes "b"'s idle one
    assert sl.cache_id("b") == 2 and sl.cache_id(None) == 0


def _sched(max_loras: int = 1) -> Scheduler:
    slots = AdapterSlots(max_loras)
    for i, n in enumerate(("x", "y")):
        slots.register(n, i + 1)
    return Scheduler(SchedulerConfig(8, 256, 512, (1,)), KVBlockManager(64, 4), slots)


def _run(sched: Scheduler) -> list[str]:
    batch = sched.schedule()
    if batch is None:
        return []
    sched.process(batch, [5] * len(batch.sampled))
    return [s.rid for s in batch.seqs]


def test_a_request_whose_adapter_finds_no_slot_waits_and_base_requests_go_on():
    sched = _sched(1)
    sp = lambda lora: SamplingParams(max_new_tokens=2, ignore_eos=True, lora_name=lora)  # noqa: E731
    sched.add("x1", [2, 3, 4], sp("x"))
    sched.add("y1", [2, 3, 4], sp("y"))
    sched.add("b1", [2, 3, 4], sp(None))
    first = sched.schedule()
    assert [s.rid for s in first.seqs] == ["x1", "b1"]  # y1 waits for the one slot
    assert sched.lora_map(first) == ["x"] and [p.lora_slot for p in first.plans] == [0, -1]
    sched.process(first, [5, 5])
    sched.process(sched.schedule(), [5, 5])  # x1 and b1 finish (2 tokens)
    batch = sched.schedule()
    assert [s.rid for s in batch.seqs] == ["y1"] and sched.lora_map(batch) == ["y"]
    sched.add("z", [2], sp("nope"))
    assert sched.finished_outputs[-1].error.startswith("lora_name")  # not loaded here: failed, nothing else


def test_prefix_pages_are_shared_within_an_adapter_only():
    kv = KVBlockManager(32, 4)
    toks = list(range(10, 23))
    blocks = kv.allocate(4)
    kv.cache_pages(toks, blocks, space=3)
    assert kv.match_prefix(toks, 0) == ([], 0)
    assert kv.match_prefix(toks, 5) == ([], 0)
    got, cached = kv.match_prefix(toks, 3)
    assert cached == 12 and got == blocks[:3]
    kv.release(got)
    kv.release(blocks)
    kv.check_invariants()


def _config(tmp_path, **cfg) -> str:
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    base.update(cfg)
    (tmp_path / "adapter_config.json").write_text(json.dumps(base))
    return str(tmp_path)


def test_adapter_configs_are_checked_naming_what_is_wrong(tmp_path):
    cfg = read_config(_config(tmp_path), max_rank=16)
    assert (cfg.rank, cfg.scaling, cfg.target_modules) == (8, 2.0, ["q_proj", "v_proj"])
    assert read_config(_config(tmp_path, use_rslora=True), 16).scaling == pytest.approx(16 / 8 ** 0.5)
    assert read_config(_config(tmp_path, target_modules="model.*(q_proj|down_proj)"), 16).target_modules == \
        ["down_proj", "q_proj"]
    for change, msg in (({"r": 32}, "max_lora_rank"), ({"target_modules": ["lm_head"]}, "lm_head"),
                        ({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias"),
                        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"), ({"peft_type": "IA3"}, "peft_type")):
        with pytest.raises(InvalidParameter, match=f"lora_path.*{msg}"):
            read_config(_config(tmp_path, **change), max_rank=16)
    with pytest.raises(InvalidParameter, match="lora_path.*gate_proj"):
        read_config(_config(tmp_path, target_modules=["gate_proj"]), 16, supported=("q_proj", "v_proj"))
    with pytest.raises(InvalidParameter, match="lora_path"):
        read_config(str(tmp_path / "nowhere"), 16)


def test_lora_fields_are_validated_at_the_edge():
    with pytest.raises(InvalidParameter, match="max_loras"):
        EngineConfig(model="/m", enable_lora=True, max_loras=0)
    with pytest.raises(InvalidParameter, match="max_lora_rank"):
        EngineConfig(model="/m", enable_lora=True, max_lora_rank=1024)
    with pytest.raises(InvalidParameter, match="lora_modules.*enable_lora"):
        EngineConfig(model="/m", lora_modules={"a": "/p"})
    with pytest.raises(InvalidParameter, match="enable_lora.*dp_attention"):
        EngineConfig(model="/m", enable_lora=True, tp_size=2, dp_size=2, enable_dp_attention=True)
    for bad in ("", 5, "x" * 300):
        with pytest.raises(InvalidParameter, match="lora_name"):
            SamplingParams(lora_name=bad)
    assert SamplingParams.from_any({"lora_name": "sql"}).lora_name == "sql"


_INTERPRETED = """
import numpy as np, torch
from flotilla.lora.kernels import apply_triton, apply_reference, segments
from flotilla.lora.layers import LoraBatch
g = torch.Generator().manual_seed(0)
for t, k, n, r, ns in ((40, 64, 96, 16, 3), (5, 128, 64, 48, 2), (33, 200, 70, 20, 4)):
    x, a = torch.randn(t, k, generator=g), torch.randn(4, r, k, generator=g)
    b, y = torch.randn(4, n, r, generator=g), torch.randn(t, n, generator=g)
    slots = np.random.default_rng(t).integers(-1, ns, size=t)
    groups = [(s, torch.from_numpy(ix.astype(np.int64))) for s, ix in segments(slots).groups]
    ref = apply_reference(x, y.clone(), a, b, groups)
    batch = LoraBatch(4, torch.device("cpu"), True)
    batch.set_rows(slots)
    got = apply_triton(x, y.clone(), a, b, *batch.meta, rank=r)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-3), (got - ref).abs().max()
    assert torch.equal(got[slots < 0], y[slots < 0])
    batch.graph_buffers(64)  # the graph path: static buffers, padded rows on the base model
    batch.fill_graph(np.concatenate([slots, -np.ones(64 - t, dtype=np.int64)]))
    xg, yg = torch.cat([x, torch.zeros(64 - t, k)]), torch.cat([y, torch.zeros(64 - t, n)])
    assert torch.allclose(apply_triton(xg, yg, a, b, *batch.meta, rank=r)[:t], ref, rtol=1e-4, atol=1e-3)
print("ok")
"""


def test_the_triton_kernels_equal_the_reference_in_the_interpreter():
    """apply_triton == apply_reference under TRITON_INTERPRET=1 (where Triton is installed), eager and through the
    graph buffers; base rows untouched. The same check on the GPU: scripts/lora_gpu.py kernels."""
    import os
    import pathlib
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
