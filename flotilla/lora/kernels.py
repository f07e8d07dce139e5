"""The batched LoRA matmuls: ``y[t] += (x[t] @ A[s_t]^T) @ B[s_t]^T`` for every token ``t`` whose request runs
adapter slot ``s_t`` (tokens of the base model, slot -1, are left alone).

Tokens are grouped by slot into *segments* on the host (``segments``): the token rows sorted by slot, cut into
blocks of at most ``BLOCK_M`` rows of one slot. Each block reads its adapter's A and B once and runs two small
tensor-core matmuls (shrink ``x A^T`` to rank width, expand ``h B^T``), so a batch mixing many requests of a few
adapters costs a few blocks per adapter, not a pass over the adapter per token.

Two implementations with the same contract: ``apply_reference`` (torch: one gather, two matmuls and an
index_add per slot; the oracle, and the path on CPU) and ``apply_triton`` (the two kernels; CUDA). The Triton
grid is fixed by the size of the block arrays, and blocks of length 0 do nothing, so a CUDA graph captured
with the arrays at their largest size replays any batch of up to that many tokens.

Scaling (``lora_alpha / r``) is folded into B when an adapter is activated, so neither path multiplies by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK_M = 16


@dataclass
class Segments:
    """Host-side grouping of one forward's LoRA rows. ``perm``: token rows sorted by slot; block ``b`` covers
    ``perm[start[b]:start[b] + length[b]]``, all of slot ``slot[b]``. ``groups``: (slot, rows) per slot present."""

    perm: np.ndarray
    slot: np.ndarray
    start: np.ndarray
    length: np.ndarray
    groups: list[tuple[int, np.ndarray]]

    @property
    def num_rows(self) -> int:
        return int(self.perm.shape[0])


def segments(slot_ids: np.ndarray, block_m: int = BLOCK_M) -> Segments:
    """Group the rows with slot >= 0 by slot, and cut each group into blocks of ``block_m`` rows."""
    slot_ids = np.asarray(slot_ids, dtype=np.int64)
    rows = np.nonzero(slot_ids >= 0)[0]
    order = rows[np.argsort(slot_ids[rows], kind="stable")]
    sorted_slots = slot_ids[order]
    groups: list[tuple[int, np.ndarray]] = []
    b_slot: list[int] = []
    b_start: list[int] = []
    b_len: list[int] = []
    if order.size:
        cuts = np.nonzero(np.diff(sorted_slots))[0] + 1
        bounds = [0, *cuts.tolist(), int(order.size)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            s = int(sorted_slots[a])
            groups.append((s, order[a:b]))
            for c in range(a, b, block_m):
                b_slot.append(s)
                b_start.append(c)
                b_len.append(min(block_m, b - c))
    as_i32 = lambda v: np.asarray(v, dtype=np.int32)  # noqa: E731
    return Segments(order.astype(np.int32), as_i32(b_slot), as_i32(b_start), as_i32(b_len), groups)


def max_blocks(num_tokens: int, num_slots: int, block_m: int = BLOCK_M) -> int:
    """The most blocks ``num_tokens`` rows over ``num_slots`` slots can make (the graph's fixed grid)."""
    return -(-num_tokens // block_m) + num_slots


# ----------------------------------------------------------------------------------------------- reference
def apply_reference(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    groups: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """``y`` plus every group's LoRA update, in x's dtype (PEFT's order: ``(x A^T) B^T``). ``a``: [slots, R, in],
    ``b``: [slots, out, R]; ``groups``: (slot, row indices on y's device)."""
    for slot, rows in groups:
        h = x.index_select(0, rows) @ a[slot].t()
        y = y.index_add(0, rows, (h @ b[slot].t()).to(y.dtype))
    return y


# ----------------------------------------------------------------------------------------------- triton
_kernels = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def shrink(x_ptr, a_ptr, h_ptr, perm_ptr, bslot_ptr, bstart_ptr, blen_ptr, K, R,
               stride_xm, stride_as, stride_ar, stride_hm, stride_hs,
               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        """h[row, split, :] = x[row, k-range of split] @ A[slot, :, k-range]^T (fp32 partial sums)."""
        blk = tl.program_id(0)
        split = tl.program_id(1)
        n = tl.load(blen_ptr + blk)
        if n > 0:
            slot = tl.load(bslot_ptr + blk).to(tl.int64)
            start = tl.load(bstart_ptr + blk)
            offs_m = tl.arange(0, BLOCK_M)
            mmask = offs_m < n
            rows = tl.load(perm_ptr + start + offs_m, mask=mmask, other=0).to(tl.int64)
            offs_r = tl.arange(0, BLOCK_R)
            rmask = offs_r < R
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
            k_lo = split * k_chunk
            for k in range(k_lo, k_lo + k_chunk, BLOCK_K):
                offs_k = k + tl.arange(0, BLOCK_K)
                kmask = offs_k < K
                xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                             mask=mmask[:, None] & kmask[None, :], other=0.0)
                at = tl.load(a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :],
                             mask=rmask[:, None] & kmask[None, :], other=0.0)
                acc += tl.dot(xt, tl.trans(at))
            tl.store(h_ptr + rows[:, None] * stride_hm + split * stride_hs + offs_r[None, :], acc,
                     mask=mmask[:, None] & rmask[None, :])

    @triton.jit
    def expand(h_ptr, b_ptr, y_ptr, perm_ptr, bslot_ptr, bstart_ptr, blen_ptr, N, R,
               stride_hm, stride_hs, stride_bs, stride_bn, stride_ym,
               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
        """y[row, n-block] += (sum over splits of h[row]) @ B[slot, n-block, :]^T."""
        blk = tl.program_id(0)
        nb = tl.program_id(1)
        n = tl.load(blen_ptr + blk)
        if n > 0:
            slot = tl.load(bslot_ptr + blk).to(tl.int64)
            start = tl.load(bstart_ptr + blk)
            offs_m = tl.arange(0, BLOCK_M)
            mmask = offs_m < n
            rows = tl.load(perm_ptr + start + offs_m, mask=mmask, other=0).to(tl.int64)
            offs_r = tl.arange(0, BLOCK_R)
            rmask = offs_r < R
            h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                h += tl.load(h_ptr + rows[:, None] * stride_hm + s * stride_hs + offs_r[None, :],
                             mask=mmask[:, None] & rmask[None, :], other=0.0)
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = offs_n < N
            bt = tl.load(b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :],
                         mask=nmask[:, None] & rmask[None, :], other=0.0)
            out = tl.dot(h.to(bt.dtype), tl.trans(bt))
            ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
            ymask = mmask[:, None] & nmask[None, :]
            yt = tl.load(ptrs, mask=ymask, other=0.0)
            tl.store(ptrs, (yt.to(tl.float32) + out).to(yt.dtype), mask=ymask)

    return shrink, expand


def split_k_for(num_blocks: int, k: int, block_k: int = 64) -> int:
    """Split the shrink's reduction so a batch of few blocks still fills the GPU (a power of two; fixed by the
    number of blocks, so a graph's replays run the split it was captured with)."""
    split = 1
    while split < 16 and num_blocks * split < 128 and k // (block_k * split * 2) >= 1:
        split *= 2
    return split


def apply_triton(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, perm: torch.Tensor,
                 bslot: torch.Tensor, bstart: torch.Tensor, blen: torch.Tensor, rank: int) -> torch.Tensor:
    """``y`` += the LoRA update, in place (the Triton kernels). ``perm``/``bslot``/``bstart``/``blen``: a
    ``Segments`` on the device (int32; blocks of length 0 are skipped); ``rank``: the padded rank width of
    ``a``/``b`` actually used (<= a.shape[1])."""
    global _kernels
    if _kernels is None:
        _kernels = _build()
    shrink, expand = _kernels
    import triton

    nblk = int(blen.shape[0])
    if nblk == 0:
        return y
    x = x.contiguous()
    k, n_out = x.shape[1], y.shape[1]
    assert y.stride(1) == 1 and a.stride(2) == 1 and b.stride(2) == 1
    block_r = max(16, triton.next_power_of_2(rank))
    block_k = 64
    split = split_k_for(nblk, k, block_k)
    h = torch.empty((x.shape[0], split, block_r), dtype=torch.float32, device=x.device)
    shrink[(nblk, split)](x, a, h, perm, bslot, bstart, blen, k, rank,
                          x.stride(0), a.stride(0), a.stride(1), h.stride(0), h.stride(1),
                          BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split)
    block_n = 64 if block_r <= 64 else 32
    expand[(nblk, triton.cdiv(n_out, block_n))](h, b, y, perm, bslot, bstart, blen, n_out, rank,
                                                h.stride(0), h.stride(1), b.stride(0), b.stride(1), y.stride(0),
                                                BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_N=block_n, SPLIT_K=split)
    return y
