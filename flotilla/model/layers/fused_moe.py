"""Fused MoE for CUDA in Triton: routing, per-expert sort/pad and the two grouped GEMMs on the device.

Why: the torch grouped path (``moe.grouped_experts``) loops over the experts in Python with a host sync
(``.tolist()``) in every layer, so a decode step of a 128-expert model is thousands of tiny launches and
48 syncs, and it cannot be captured in a CUDA graph. Here one MoE layer is five kernels with no host sync:

1. ``_route_kernel``: softmax in float32, top-k, optional renormalisation; one program per token.
2. ``_align_kernel``: the T*k (token, slot) pairs sorted by expert and each expert's run padded to a
   multiple of ``BLOCK_M``; writes the sorted pair ids (padding = the sentinel T*k), the expert of every
   ``BLOCK_M`` block and the padded total. One program; every buffer has a size known from T alone
   (``max_padded``), so the layer is graph-capturable.
3. ``_moe_gemm_kernel`` (gated): for every block, x[pair // k] @ w13[e].T with the gate and up halves
   accumulated side by side and SiLU(gate) * up applied before the store: the [T*k, 2I] gate_up tensor
   is never written.
4. ``_moe_gemm_kernel`` (down): act[pair] @ w2[e].T times the pair's routing weight, into [T*k, H].
5. a sum over the k slots (torch), which rounds once.

A block whose first row lies beyond the padded total returns at once, so the grid may be sized for the
worst case. The torch functions ``route_torch`` and ``align_torch`` compute what kernels 1 and 2 compute
(same layout, same sentinel) and run anywhere: they are the CPU-testable statement of the contract.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference path serves
    triton = None
    tl = None

CONFIG_DIR = pathlib.Path(__file__).parent / "moe_configs"
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

# Used where no measured file matches (E, N, K): small BLOCK_M for decode, larger tiles for prefill.
_DEFAULT_SMALL = {"BLOCK_M": 16, "up": {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3},
                  "down": {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}}
_DEFAULT_MID = {"BLOCK_M": 32, "up": {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
                "down": {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}}
_DEFAULT_LARGE = {"BLOCK_M": 64, "up": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
                  "down": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}}


# ---------------------------------------------------------------------------------------------- configs
def bucket_of(num_tokens: int) -> int:
    """The smallest bucket >= num_tokens (the largest bucket beyond it). Powers of two, like the CUDA graph
    ladder's, so a graph batch and the eager forward of the same padded batch pick the same tiles."""
    for b in BUCKETS:
        if b >= num_tokens:
            return b
    return BUCKETS[-1]


def config_file_name(num_experts: int, n: int, k: int) -> str:
    """E = experts, N = the intermediate size per rank (w13 holds 2N rows), K = hidden size."""
    return f"E={num_experts},N={n},K={k},device=H200.json"


@functools.lru_cache(maxsize=None)
def _load_configs(num_experts: int, n: int, k: int) -> dict[int, dict[str, Any]] | None:
    path = CONFIG_DIR / config_file_name(num_experts, n, k)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return {int(b): c for b, c in raw["configs"].items()}


def default_config(num_tokens: int) -> dict[str, Any]:
    if num_tokens <= 32:
        return _DEFAULT_SMALL
    if num_tokens <= 512:
        return _DEFAULT_MID
    return _DEFAULT_LARGE


def get_config(num_experts: int, n: int, k: int, num_tokens: int) -> dict[str, Any]:
    """The measured tiles for this shape and the bucket of ``num_tokens``, else the default."""
    table = _load_configs(num_experts, n, k)
    b = bucket_of(num_tokens)
    if table:
        if b in table:
            return table[b]
        near = min(table, key=lambda x: abs(x - b))
        return table[near]
    return default_config(num_tokens)


# ---------------------------------------------------------------------------------------------- torch contract
def route_torch(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, k], expert ids int32 [T, k]): what ``_route_kernel`` writes."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids.to(torch.int32)


def max_padded(numel: int, num_experts: int, block_m: int) -> int:
    """Worst-case length of the padded sorted list: at most min(E, T*k) experts have pairs, each padded by
    fewer than BLOCK_M; rounded up to whole blocks."""
    n = numel + min(num_experts, numel) * (block_m - 1)
    return -(-n // block_m) * block_m


def align_torch(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted pair ids [max_padded] int32, expert of each block [max_padded / BLOCK_M] int32, padded total [1]).

    Pairs are numbered t * k + j; expert e's pairs occupy [start_e, start_e + count_e) in ascending pair
    order, followed by padding (the sentinel T*k) up to start_e + ceil(count_e / BLOCK_M) * BLOCK_M, where
    start_e is the padded count of the experts before e. Blocks past the padded total hold expert -1 and are
    never read. No host sync: every shape depends on T and E only.
    """
    flat = ids.reshape(-1).long()
    numel = flat.numel()
    dev = flat.device
    size = max_padded(numel, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    cum = torch.cumsum(padded, 0)
    starts = cum - padded
    order = torch.sort(flat, stable=True)
    rank = torch.arange(numel, device=dev) - (torch.cumsum(counts, 0) - counts)[order.values]
    sorted_ids = torch.full((size,), numel, dtype=torch.int32, device=dev)
    sorted_ids[starts[order.values] + rank] = order.indices.to(torch.int32)
    block_pos = torch.arange(size // block_m, device=dev) * block_m
    experts = (cum.unsqueeze(0) <= block_pos.unsqueeze(1)).sum(1)
    total = cum[-1:]
    experts = torch.where(block_pos < total, experts, torch.full_like(experts, -1))
    return sorted_ids, experts.to(torch.int32), total.to(torch.int32)


def experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, top_k: int,
                  sorted_ids: torch.Tensor, block_experts: torch.Tensor, block_m: int) -> torch.Tensor:
    """What the two GEMM kernels compute from the aligned layout, block by block in torch (slow; for tests:
    it checks that the layout alone, sentinels and all, gives the reference result)."""
    numel = x.shape[0] * top_k
    out = torch.zeros(numel, w2.shape[1], dtype=torch.float32, device=x.device)
    inter = w2.shape[2]
    for b, e in enumerate(block_experts.tolist()):
        if e < 0:
            continue
        rows = sorted_ids[b * block_m:(b + 1) * block_m].long()
        rows = rows[rows < numel]
        if rows.numel() == 0:
            continue
        gu = x[rows // top_k].float() @ w13[e].float().t()
        act = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        out[rows] = (act @ w2[e].float().t()) * weights.reshape(-1)[rows].float().unsqueeze(1)
    return out.view(x.shape[0], top_k, -1).sum(1).to(x.dtype)


# ---------------------------------------------------------------------------------------------- Triton kernels
if triton is not None:
    @triton.jit
    def _route_kernel(logits_ptr, w_ptr, ids_ptr, stride_l, E, TOPK: tl.constexpr, K_P2: tl.constexpr,
                      E_P2: tl.constexpr, NORMALIZE: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, E_P2)
        x = tl.load(logits_ptr + t * stride_l + offs, mask=offs < E, other=float("-inf")).to(tl.float32)
        x = x - tl.max(x, axis=0)
        p = tl.exp(x)
        p = p / tl.sum(p, axis=0)
        p = tl.where(offs < E, p, -1.0)
        kk = tl.arange(0, K_P2)
        top_w = tl.zeros([K_P2], dtype=tl.float32)
        top_i = tl.zeros([K_P2], dtype=tl.int32)
        for j in tl.static_range(TOPK):
            m = tl.max(p, axis=0)
            idx = tl.min(tl.where(p == m, offs, E_P2), axis=0)  # lowest index among ties, as torch.topk
            top_w = tl.where(kk == j, m, top_w)
            top_i = tl.where(kk == j, idx, top_i)
            p = tl.where(offs == idx, -1.0, p)
        if NORMALIZE:
            top_w = top_w / tl.sum(top_w, axis=0)
        tl.store(w_ptr + t * TOPK + kk, top_w, mask=kk < TOPK)
        tl.store(ids_ptr + t * TOPK + kk, top_i, mask=kk < TOPK)

    @triton.jit(do_not_specialize=["numel", "num_blocks"])
    def _align_kernel(ids_ptr, sorted_ptr, experts_ptr, total_ptr, numel, E, num_blocks,
                      BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr):
        offs_e = tl.arange(0, E_P2)
        counts = tl.zeros([E_P2], dtype=tl.int32)
        for start in range(0, numel, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1)
            counts += tl.sum((e[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        cum = tl.cumsum(padded, axis=0)
        starts = cum - padded
        total = tl.sum(padded, axis=0)
        tl.store(total_ptr, total)
        # pairs: destination = start of the expert + pairs of that expert seen so far (earlier chunks and
        # earlier rows of this chunk), so each expert's pairs stay in ascending order
        run = starts
        for start in range(0, numel, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1)
            eq = (e[:, None] == offs_e[None, :]).to(tl.int32)
            before = tl.cumsum(eq, axis=0) - eq
            dest = tl.sum(eq * (before + run[None, :]), axis=1)
            tl.store(sorted_ptr + dest, offs, mask=offs < numel)
            run += tl.sum(eq, axis=0)
        # padding after each expert's pairs (addresses disjoint from the pairs' own)
        pad = tl.arange(0, BLOCK_M)
        addr = (starts + counts)[:, None] + pad[None, :]
        fill = tl.zeros([E_P2, BLOCK_M], dtype=tl.int32) + numel
        tl.store(sorted_ptr + addr, fill, mask=pad[None, :] < (padded - counts)[:, None])
        # expert of every block: the number of experts whose padded run ends at or before the block start
        for b0 in range(0, num_blocks, CHUNK):
            b = b0 + tl.arange(0, CHUNK)
            pos = b * BLOCK_M
            ex = tl.sum((cum[None, :] <= pos[:, None]).to(tl.int32), axis=1)
            ex = tl.where(pos < total, ex, -1)
            tl.store(experts_ptr + b, ex, mask=b < num_blocks)
            # slots past the padded total (never read by the GEMMs) get the sentinel too, so the whole
            # buffer is a function of the ids alone (what the torch version writes)
            tail = pos[:, None] + pad[None, :]
            tl.store(sorted_ptr + tail, tl.zeros([CHUNK, BLOCK_M], dtype=tl.int32) + numel,
                     mask=((pos >= total) & (b < num_blocks))[:, None])

    @triton.jit(do_not_specialize=["num_valid", "num_blocks"])  # one compile serves every batch size
    def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, w_ptr, sorted_ptr, experts_ptr, total_ptr,
                         N, K, num_valid, num_blocks, stride_am, stride_be, stride_bn, stride_cm,
                         A_DIV: tl.constexpr, GATED: tl.constexpr, MUL_W: tl.constexpr, EVEN_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, PREC: tl.constexpr):
        """C[pair] = A[pair // A_DIV] @ B[e].T over one BLOCK_M block of one expert. GATED: B holds 2N rows
        (gate, then up) and C = SiLU(A @ gate.T) * (A @ up.T). MUL_W: C *= routing weight of the pair."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        size_m = tl.minimum(num_blocks - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % size_m
        pid_n = (pid % in_group) // size_m
        total = tl.load(total_ptr)
        if pid_m * BLOCK_M >= total:
            return
        expert = tl.load(experts_ptr + pid_m).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + offs_m)
        valid = pair < num_valid
        rows = (pair // A_DIV).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_nc = tl.where(n_ok, offs_n, 0).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + expert * stride_be + offs_nc[None, :] * stride_bn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # used only when GATED
        up_off = N * stride_bn
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
                b = tl.load(b_ptrs)
                if GATED:
                    b_up = tl.load(b_ptrs + up_off)
            else:
                k_ok = offs_k < K - kb * BLOCK_K
                a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
                if GATED:
                    b_up = tl.load(b_ptrs + up_off, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            if GATED:
                acc_up = tl.dot(a, b_up, acc_up, input_precision=PREC)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if MUL_W:
            wt = tl.load(w_ptr + pair, mask=valid, other=0.0)
            acc = acc * wt[:, None]
        c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


def _p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def route_triton(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t, e = logits.shape
    w = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    if t:
        _route_kernel[(t,)](logits, w, ids, logits.stride(0), e, TOPK=top_k, K_P2=_p2(top_k), E_P2=_p2(e),
                            NORMALIZE=normalize, num_warps=1)
    return w, ids


# One program walks every pair twice, so its time grows with T*k: past this many pairs (decode batches of
# 256 at top-8 stay within it, so every CUDA graph uses the kernel) the torch version's dozen launches win.
ALIGN_KERNEL_MAX_PAIRS = 2048


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The aligned layout: one Triton launch for small batches, the torch version (still no host sync) for
    prefill-sized ones."""
    if ids.numel() <= ALIGN_KERNEL_MAX_PAIRS:
        return align_triton(ids, num_experts, block_m)
    return align_torch(ids, num_experts, block_m)


def align_triton(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same outputs as ``align_torch``, in one kernel launch."""
    ids = ids.reshape(-1).to(torch.int32).contiguous()
    numel = ids.numel()
    size = max_padded(numel, num_experts, block_m)
    dev = ids.device
    sorted_ids = torch.empty(size, dtype=torch.int32, device=dev)
    experts = torch.empty(size // block_m, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    _align_kernel[(1,)](ids, sorted_ids, experts, total, numel, num_experts, size // block_m,
                        BLOCK_M=block_m, E_P2=_p2(num_experts), CHUNK=32, num_warps=4)
    return sorted_ids, experts, total


SMEM_BYTES = 225 * 1024  # the H200's 227 KB per block, less a margin


def fit_smem(cfg: dict[str, Any], block_m: int, gated: bool, elem_bytes: int) -> dict[str, Any]:
    """The tiles with their pipeline shrunk until it fits shared memory: Triton keeps ``num_stages - 1``
    buffers of one A tile and one (gated: two) B tiles. The measured tables are for bf16; float32 models
    (the tests, tiny checkpoints) need half the depth. Fewer stages first, then a shorter BLOCK_K."""
    bn, bk, stages = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"]

    def need(bk_: int, st: int) -> int:
        return (st - 1) * (block_m * bk_ + (2 if gated else 1) * bk_ * bn) * elem_bytes

    while need(bk, stages) > SMEM_BYTES and stages > 2:
        stages -= 1
    while need(bk, stages) > SMEM_BYTES and bk > 32:
        bk //= 2
    if (bk, stages) == (cfg["BLOCK_K"], cfg["num_stages"]):
        return cfg
    return {**cfg, "BLOCK_K": bk, "num_stages": stages}


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None, sorted_ids: torch.Tensor,
          experts: torch.Tensor, total: torch.Tensor, n: int, a_div: int, gated: bool, block_m: int,
          cfg: dict[str, Any]) -> None:
    k = a.shape[1]
    cfg = fit_smem(cfg, block_m, gated, a.element_size())
    num_blocks = experts.numel()
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (num_blocks * triton.cdiv(n, bn),)
    _moe_gemm_kernel[grid](
        a, b, c, w if w is not None else c, sorted_ids, experts, total,
        n, k, c.shape[0], num_blocks, a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        A_DIV=a_div, GATED=gated, MUL_W=w is not None, EVEN_K=k % bk == 0,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        PREC="ieee" if a.dtype == torch.float32 else "tf32",  # float32 models: no TF32 rounding
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  config: dict[str, Any] | None = None) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) with w13 [E, 2I, H] (gate then up), w2 [E, H, I]."""
    t, top_k = ids.shape
    e, two_i, h = w13.shape
    inter = two_i // 2
    cfg = config or get_config(e, inter, h, t)
    bm = cfg["BLOCK_M"]
    if not (w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("fused_experts: expert weights must be contiguous (K innermost)")
    x = x.contiguous()
    sorted_ids, experts, total = align(ids, e, bm)
    act = torch.empty((t * top_k, inter), dtype=x.dtype, device=x.device)
    _gemm(x, w13, act, None, sorted_ids, experts, total, inter, top_k, True, bm, cfg["up"])
    out = torch.empty((t * top_k, h), dtype=x.dtype, device=x.device)
    _gemm(act, w2, out, weights.reshape(-1).contiguous(), sorted_ids, experts, total, h, 1, False, bm, cfg["down"])
    return out.view(t, top_k, h).sum(dim=1)


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
              normalize: bool, config: dict[str, Any] | None = None) -> torch.Tensor:
    """The whole MoE layer on the device: route, align, gate_up (+SiLU-and-mul), down (+weights), sum."""
    weights, ids = route_triton(router_logits, top_k, normalize)
    return fused_experts(x, w13, w2, weights, ids, config)
