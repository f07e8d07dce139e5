"""Fused MoE: the device-side layout (routing, sort/pad per expert) against the torch grouped reference.

The CPU tests check the torch statement of the kernels' contract (``route_torch``, ``align_torch``,
``experts_torch``); the CUDA tests check the Triton kernels against it and the whole layer against
``moe.grouped_experts`` in bf16, plus a CUDA-graph replay against eager.
"""

from __future__ import annotations

import pytest
import torch

from flotilla.model.layers import fused_moe as fm
from flotilla.model.layers.moe import grouped_experts, route

CUDA = torch.cuda.is_available() and fm.triton is not None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")


def routed_ids(kind: str, t: int, e: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Expert ids [t, k] (distinct per token) for one of the routing patterns the kernels must survive."""
    if kind == "random":
        return torch.rand(t, e, generator=gen).topk(k, dim=-1).indices
    if kind == "skewed":  # every token routes slot 0 to expert 0; expert e-1 never gets a token
        ids = torch.rand(t, e - 2, generator=gen).topk(k - 1, dim=-1).indices + 1
        return torch.cat([torch.zeros(t, 1, dtype=torch.long), ids], 1)
    if kind == "one_expert":  # k = 1: every token to one expert
        return torch.full((t, 1), e // 2, dtype=torch.long)
    raise ValueError(kind)


CASES = [("random", 1, 128, 8), ("random", 512, 128, 8), ("skewed", 37, 16, 4), ("one_expert", 300, 8, 1),
         ("random", 3, 8, 2), ("random", 64, 128, 8)]


def check_layout(ids: torch.Tensor, e: int, bm: int, sorted_ids: torch.Tensor, experts: torch.Tensor,
                 total: torch.Tensor) -> None:
    flat = ids.reshape(-1).cpu().long()
    numel = flat.numel()
    s, ex, tot = sorted_ids.cpu().long(), experts.cpu().long(), int(total.cpu()[0])
    counts = torch.bincount(flat, minlength=e)
    assert tot == int(((counts + bm - 1) // bm * bm).sum())
    assert s.numel() == fm.max_padded(numel, e, bm) and ex.numel() * bm == s.numel()
    real = s[:tot][s[:tot] < numel]
    assert sorted(real.tolist()) == list(range(numel)), "every pair exactly once"
    assert bool((s[:tot][s[:tot] >= numel] == numel).all()), "padding holds the sentinel"
    for b in range(tot // bm):
        rows = s[b * bm:(b + 1) * bm]
        rows = rows[rows < numel]
        assert bool((flat[rows] == ex[b]).all()), "a block holds one expert's pairs"
        assert rows.tolist() == sorted(rows.tolist())
    assert bool((ex[tot // bm:] == -1).all())


@pytest.mark.parametrize("kind,t,e,k", CASES)
@pytest.mark.parametrize("bm", [16, 64])
def test_align_torch_layout(kind, t, e, k, bm):
    gen = torch.Generator().manual_seed(t * 7 + e)
    ids = routed_ids(kind, t, e, k, gen)
    check_layout(ids, e, bm, *fm.align_torch(ids, e, bm))


@pytest.mark.parametrize("kind,t,e,k", CASES[:4] + CASES[4:5])
def test_layout_gives_reference_result(kind, t, e, k):
    """Computing block by block from the aligned layout equals the reference grouping (float32, CPU)."""
    gen = torch.Generator().manual_seed(1)
    h, inter, bm = 32, 24, 16
    x = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * inter, h, generator=gen) / h ** 0.5
    w2 = torch.randn(e, h, inter, generator=gen) / inter ** 0.5
    ids = routed_ids(kind, t, e, k, gen)
    weights = torch.rand(t, k, generator=gen)
    ref = grouped_experts(x, w13, w2, weights, ids)
    got = fm.experts_torch(x, w13, w2, weights, k, *fm.align_torch(ids, e, bm)[:2], bm)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_route_torch_matches_reference():
    logits = torch.randn(50, 128, generator=torch.Generator().manual_seed(2))
    for normalize in (True, False):
        w, ids = fm.route_torch(logits, 8, normalize)
        rw, rids = route(logits, 8, normalize)
        assert torch.equal(ids.long(), rids)
        torch.testing.assert_close(w, rw.float())


def test_config_lookup():
    cfg = fm.get_config(128, 768, 2048, 1)
    assert {"BLOCK_M", "up", "down"} <= set(cfg)
    assert fm.get_config(3, 5, 7, 10) is fm.default_config(10)  # no file: the default
    assert [fm.bucket_of(n) for n in (1, 3, 16, 17, 10 ** 6)] == [1, 4, 16, 32, fm.BUCKETS[-1]]


# ---------------------------------------------------------------------------------------------- CUDA
@needs_cuda
def test_route_triton():
    logits = torch.randn(513, 128, device="cuda")  # float32: no ties for topk to order differently
    for normalize in (True, False):
        w, ids = fm.route_triton(logits, 8, normalize)
        rw, rids = fm.route_torch(logits, 8, normalize)
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("kind,t,e,k", CASES)
@pytest.mark.parametrize("bm", [16, 64])
def test_align_triton_equals_torch(kind, t, e, k, bm):
    gen = torch.Generator().manual_seed(t + e)
    ids = routed_ids(kind, t, e, k, gen).to(torch.int32).cuda()
    got = fm.align_triton(ids, e, bm)
    want = fm.align_torch(ids, e, bm)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_cuda
@pytest.mark.parametrize("kind,t,e,k", CASES)
@pytest.mark.parametrize("shape", [(2048, 768), (64, 32)])
def test_fused_experts_bf16(kind, t, e, k, shape):
    h, inter = shape
    gen = torch.Generator(device="cuda").manual_seed(3)
    dt = torch.bfloat16
    x = torch.randn(t, h, device="cuda", dtype=dt, generator=gen)
    w13 = (torch.randn(e, 2 * inter, h, device="cuda", generator=gen) / h ** 0.5).to(dt)
    w2 = (torch.randn(e, h, inter, device="cuda", generator=gen) / inter ** 0.5).to(dt)
    ids = routed_ids(kind, t, e, k, torch.Generator().manual_seed(4)).cuda()
    weights = torch.rand(t, k, device="cuda", generator=gen)
    ref = grouped_experts(x.float(), w13.float(), w2.float(), weights, ids)
    got = fm.fused_experts(x, w13, w2, weights, ids.to(torch.int32)).float()
    err = (got - ref).norm() / ref.norm()
    assert err < 1e-2, f"relative error {err:.3g}"
    # float32 end to end (no TF32): close to the reference at float32 precision
    got32 = fm.fused_experts(x.float(), w13.float(), w2.float(), weights, ids.to(torch.int32))
    torch.testing.assert_close(got32, ref, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_fused_moe_layer_and_graph_replay():
    """Router logits in, output out: matches the torch layer, and a CUDA-graph replay equals eager bit for bit."""
    t, e, k, h, inter = 16, 128, 8, 2048, 768
    dt = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(t, h, device="cuda", dtype=dt, generator=gen)
    logits = torch.randn(t, e, device="cuda", dtype=dt, generator=gen)
    w13 = (torch.randn(e, 2 * inter, h, device="cuda", generator=gen) / h ** 0.5).to(dt)
    w2 = (torch.randn(e, h, inter, device="cuda", generator=gen) / inter ** 0.5).to(dt)
    eager = fm.fused_moe(x, logits, w13, w2, k, True)
    rw, rids = route(logits.float(), k, True)
    ref = grouped_experts(x.float(), w13.float(), w2.float(), rw, rids)
    assert (eager.float() - ref).norm() / ref.norm() < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fm.fused_moe(x, logits, w13, w2, k, True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
