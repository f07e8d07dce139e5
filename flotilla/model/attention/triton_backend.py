"""Paged attention for CUDA, in Triton: a KV store, a split-K decode kernel and a varlen prefill kernel.

Why Triton (and not FlexAttention or torch's varlen attention): both kernels read K/V straight out of the
paged pool ([num_blocks, block_size, kv_heads, head_dim] per layer) through the block table, so a prefill
with a cached prefix costs no gather copy, and neither needs torch.compile or a host-side look at the
lengths, so the decode path can be captured in a CUDA graph. docs/benchmarks.md has the measurements
against the torch reference backend (``torch_backend.py``), which stays the oracle for these kernels.

* ``write_kv``: one program per new token copies its K and V rows to ``slot_mapping[t]``; a negative slot
  is skipped, which is how padded rows of a CUDA-graph batch leave the cache alone.
* decode (every sequence has one new token): flash-decoding. Programs are (sequence, KV head, split); each
  loads the ``G`` query heads that share its KV head as one [16+, D] tile, so K/V are read once per KV head,
  and walks its slice of the context. The slice is ``ceil(ctx / SPLITS)`` rounded to the tile, computed on
  the device from the context length, so the same launch (and the same graph) serves any length. Partial
  (max, sum, acc) go to a scratch buffer that a second kernel merges. ``SPLITS`` depends only on the batch
  size rounded up to a power of two, so eager runs and graph replays (padded to their bucket) of the same
  batch split identically and give bit-identical outputs.
* prefill / mixed batches: programs are (query tile, head); tiles of ``BLOCK_M`` query rows are listed on
  the host once per forward (``plan``). Each row at position p attends keys 0..p of its sequence: the cached
  prefix and the causal part of this chunk. The single-token rows of a mixed batch (its decodes) go to the
  decode kernel instead, which finds each one's query row through ``cu_q`` (see ``TritonAttention``).
* An FP8 pool (``kv_cache_dtype``): the store casts K/V to the pool's type and both kernels cast each loaded
  tile back to the query's dtype before the dot products, so FP8 halves the bytes the KV-bound decode reads
  and the math stays in bf16/fp32; the torch backend does the same casts and stays the oracle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch

from flotilla.model.attention.metadata import AttentionMetadata

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the module imports, the backend refuses to start
    triton = tl = None  # type: ignore[assignment]
    HAS_TRITON = False

LOG2E = 1.4426950408889634
# Tile shapes and pipelining, chosen by the sweep in scripts/gpu_check.py (kernels) on an H100; module-level so
# the sweep can try others. The prefill row tile is also what ``plan`` cuts the queries into.
PREFILL_CONFIG: dict[str, int] = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
DECODE_CONFIG: dict[str, int] = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
MAX_SPLITS = 32


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if HAS_TRITON:

    @triton.jit
    def _store_kv_kernel(K, V, KC, VC, SLOT, stride_kt, stride_kh, stride_vt, stride_vh, stride_cslot, stride_ch,
                         KVH: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(SLOT + t).to(tl.int64)
        h = tl.arange(0, BH)[:, None]
        d = tl.arange(0, BD)[None, :]
        m = (h < KVH) & (d < D) & (slot >= 0)
        k = tl.load(K + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=m)
        tl.store(KC + slot * stride_cslot + h * stride_ch + d, k.to(KC.dtype.element_ty), mask=m)
        v = tl.load(V + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=m)
        tl.store(VC + slot * stride_cslot + h * stride_ch + d, v.to(VC.dtype.element_ty), mask=m)

    @triton.jit
    def _decode_kernel(Q, KC, VC, BT, CTX, O, PACC, PM, PL, SEQS, CUQ, scale_log2,
                       stride_qt, stride_qh, stride_cpage, stride_cslot, stride_ch, stride_bt, stride_ot, stride_oh,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, PAGE: tl.constexpr,
                       BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, H: tl.constexpr, PREC: tl.constexpr,
                       INDIRECT: tl.constexpr):
        i = tl.program_id(0)  # the i-th single-token row of this launch
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        if INDIRECT:  # a mixed batch: row i is sequence SEQS[i], whose one query sits at CUQ[seq]
            seq = tl.load(SEQS + i)
            qrow = tl.load(CUQ + seq).to(tl.int64)
        else:  # a decode batch: sequence i, query row i
            seq = i
            qrow = i.to(tl.int64)
        ctx = tl.load(CTX + seq)
        per = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
        start = split * per
        end = tl.minimum(start + per, ctx)
        g = tl.arange(0, GP)
        d = tl.arange(0, BD)
        gm = g < G
        dm = d < D
        heads = kvh * G + g
        q = tl.load(Q + qrow * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=gm[:, None] & dm[None, :], other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, BD], tl.float32)
        bt_row = BT + seq.to(tl.int64) * stride_bt
        for n0 in range(start, end, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            tm = toks < end
            page = tl.load(bt_row + toks // PAGE, mask=tm, other=0).to(tl.int64)
            off = page * stride_cpage + (toks % PAGE) * stride_cslot + kvh * stride_ch
            kv_mask = tm[:, None] & dm[None, :]
            k = tl.load(KC + off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
            s = tl.where(tm[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(VC + off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        if SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(O + qrow * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     out.to(O.dtype.element_ty), mask=gm[:, None] & dm[None, :])
        else:
            row = (i.to(tl.int64) * H + heads) * SPLITS + split
            tl.store(PACC + row[:, None] * BD + d[None, :], acc, mask=gm[:, None])
            tl.store(PM + row, m_i, mask=gm)
            tl.store(PL + row, l_i, mask=gm)

    @triton.jit
    def _decode_reduce_kernel(O, PACC, PM, PL, SEQS, CUQ, stride_ot, stride_oh, D: tl.constexpr, BD: tl.constexpr,
                              SPLITS: tl.constexpr, SP: tl.constexpr, H: tl.constexpr, INDIRECT: tl.constexpr):
        i = tl.program_id(0)
        h = tl.program_id(1)
        if INDIRECT:
            qrow = tl.load(CUQ + tl.load(SEQS + i)).to(tl.int64)
        else:
            qrow = i.to(tl.int64)
        s = tl.arange(0, SP)
        sm = s < SPLITS
        d = tl.arange(0, BD)
        row = (i.to(tl.int64) * H + h) * SPLITS + s
        m = tl.load(PM + row, mask=sm, other=float("-inf"))
        l = tl.load(PL + row, mask=sm, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
        acc = tl.load(PACC + row[:, None] * BD + d[None, :], mask=sm[:, None], other=0.0)
        num = tl.sum(acc * w[:, None], 0)
        den = tl.sum(l * w, 0)
        out = num / tl.where(den > 0, den, 1.0)
        tl.store(O + qrow * stride_ot + h * stride_oh + d, out.to(O.dtype.element_ty), mask=d < D)

    @triton.jit
    def _prefill_kernel(Q, KC, VC, BT, CTX, CUQ, TSEQ, TQ0, O, scale_log2,
                        stride_qt, stride_qh, stride_cpage, stride_cslot, stride_ch, stride_bt, stride_ot, stride_oh,
                        G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, PAGE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        tile = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // G
        seq = tl.load(TSEQ + tile)
        q0 = tl.load(TQ0 + tile)
        qs = tl.load(CUQ + seq)
        q_len = tl.load(CUQ + seq + 1) - qs
        ctx = tl.load(CTX + seq)
        prefix = ctx - q_len
        rows = q0 + tl.arange(0, BLOCK_M)
        rm = rows < q_len
        d = tl.arange(0, BD)
        dm = d < D
        q_rows = (qs + rows).to(tl.int64)
        q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rm[:, None] & dm[None, :],
                    other=0.0)
        pos = prefix + rows
        kv_end = tl.minimum(ctx, prefix + q0 + BLOCK_M)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BD], tl.float32)
        bt_row = BT + seq.to(tl.int64) * stride_bt
        for n0 in range(0, kv_end, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            tm = toks < kv_end
            page = tl.load(bt_row + toks // PAGE, mask=tm, other=0).to(tl.int64)
            off = page * stride_cpage + (toks % PAGE) * stride_cslot + kvh * stride_ch
            kv_mask = tm[:, None] & dm[None, :]
            k = tl.load(KC + off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
            s = tl.where(tm[None, :] & (toks[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(VC + off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + q_rows[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                 mask=rm[:, None] & dm[None, :])


def _precision(dtype: torch.dtype) -> str:
    """float32 models get exact float32 dot products (Triton's default for them is tf32, ~1e-3 off)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_splits(num_seqs: int, kv_heads: int, num_sms: int = 132) -> int:
    """How many context slices each (sequence, KV head) of a decode batch is cut into.

    Enough programs to cover the GPU about twice; a power of two, and a function of the batch size rounded
    up to a power of two only, so a batch and its CUDA-graph bucket (which pads it, at most to that power of
    two) split the same way.
    """
    work = _pow2(max(1, num_seqs)) * kv_heads
    target = max(1, (2 * num_sms) // work)
    return min(MAX_SPLITS, 1 << (target.bit_length() - 1))


MIXED_MODES = ("split", "unified")


def mixed_mode(mixed: str | None, env: Mapping[str, str]) -> str:
    """The mixed-batch mode: the argument, else ``FLOTILLA_ATTENTION_MIXED``, else ``split``; checked."""
    mode = mixed or env.get("FLOTILLA_ATTENTION_MIXED") or "split"
    if mode not in MIXED_MODES:
        raise ValueError(f"FLOTILLA_ATTENTION_MIXED: {mode!r} is not one of {', '.join(MIXED_MODES)}")
    return mode


class TritonAttention:
    """Paged attention backend for CUDA (see the module docstring).

    ``mixed`` says how a mixed batch (prefill chunks beside decodes) is attended. ``split`` (the default)
    sends every single-token row to the decode kernel and only the multi-token rows to the prefill kernel:
    a prefill program holds one query head and a ``BLOCK_M``-row tile, so a decode row there wastes all but
    one row of the tile and reads its K/V once per query head instead of once per KV head (the H100 profile
    in docs/benchmarks.md §16 measured the mixed step of the 8B shape at 3x the decode step for that reason).
    ``unified`` (every row through the prefill kernel) is the older path, kept as the reference to measure
    against; ``FLOTILLA_ATTENTION_MIXED`` picks it for a whole run.
    """

    name = "triton"
    graph_safe = True  # decode reads only device tensors: it can be captured in a CUDA graph

    def __init__(self, device: torch.device | None = None, mixed: str | None = None):
        if not HAS_TRITON:
            raise ImportError("attention_backend='triton' needs the triton package")
        self.mixed = mixed_mode(mixed, os.environ)
        self.num_sms = 132
        if device is not None and device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------ planning
    def plan(self, meta: AttentionMetadata) -> None:
        """Once per forward (not per layer): which rows go to which kernel.

        ``triton_tiles`` lists the prefill kernel's (sequence, first query row) tiles; ``triton_single`` the
        sequences with one new token that the decode kernel takes instead (``split`` mode only).
        """
        if meta.is_decode or not meta.num_seqs:
            return
        q_lens = np.asarray(meta.q_lens_cpu, dtype=np.int64)
        dev = meta.cu_q.device
        split = self.mixed == "split"
        multi = q_lens > 1 if split else q_lens > 0
        single = np.flatnonzero(q_lens == 1).astype(np.int32) if split else np.empty(0, np.int32)
        meta.extra["triton_single"] = (torch.from_numpy(single).to(dev, non_blocking=True) if len(single)
                                       else None)
        block_m = PREFILL_CONFIG["BLOCK_M"]
        tiles = np.where(multi, -(-q_lens // block_m), 0)
        tile_seq = np.repeat(np.arange(len(q_lens), dtype=np.int32), tiles)
        first = np.repeat(np.cumsum(tiles) - tiles, tiles)
        tile_q0 = ((np.arange(int(tiles.sum())) - first) * block_m).astype(np.int32)
        meta.extra["triton_tiles"] = (block_m, torch.from_numpy(tile_seq).to(dev, non_blocking=True),
                                      torch.from_numpy(tile_q0).to(dev, non_blocking=True))

    # ------------------------------------------------------------------------------------------ kernels
    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        t = k.shape[0]
        if t == 0:
            return
        kvh, d = k_cache.shape[2], k_cache.shape[3]
        _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                               v.stride(1), k_cache.stride(1), k_cache.stride(2), KVH=kvh, D=d, BH=_pow2(kvh),
                               BD=_pow2(d), num_warps=1 if kvh * d <= 1024 else 4)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """q: [T, heads, dim] -> [T, heads, dim]; the new K/V are already in the cache."""
        out = torch.empty_like(q)
        if q.shape[0] == 0:
            return out
        if meta.is_decode:
            self._decode(q, k_cache, v_cache, meta, scale, out, None)
            return out
        if "triton_tiles" not in meta.extra:
            self.plan(meta)
        single = meta.extra["triton_single"]
        if single is not None:
            self._decode(q, k_cache, v_cache, meta, scale, out, single)
        if meta.extra["triton_tiles"][1].shape[0]:
            self._prefill(q, k_cache, v_cache, meta, scale, out)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, out: torch.Tensor, seqs: torch.Tensor | None) -> None:
        """One query row per sequence: every sequence of a decode batch, or the ``seqs`` of a mixed one."""
        h, d = q.shape[1], q.shape[2]
        b = q.shape[0] if seqs is None else seqs.shape[0]
        kvh = k_cache.shape[2]
        g = h // kvh
        bd = _pow2(d)
        splits = decode_splits(b, kvh, self.num_sms)
        if seqs is None:
            pacc, pm, pl = self._partials(b, h, splits, bd, q.device)
        else:  # mixed batches run eager (never in a graph): one scratch per forward, reused by every layer
            pacc, pm, pl = self._forward_partials(meta, b, h, splits, bd, q.device)
        ind = seqs if seqs is not None else meta.context_lens  # unread unless INDIRECT
        _decode_kernel[(b, kvh, splits)](
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, out, pacc, pm, pl, ind, meta.cu_q,
            scale * LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            meta.block_tables.stride(0), out.stride(0), out.stride(1),
            G=g, GP=max(16, _pow2(g)), D=d, BD=bd, PAGE=k_cache.shape[1], SPLITS=splits, H=h,
            PREC=_precision(q.dtype), INDIRECT=seqs is not None, **DECODE_CONFIG)
        if splits > 1:
            _decode_reduce_kernel[(b, h)](out, pacc, pm, pl, ind, meta.cu_q, out.stride(0), out.stride(1), D=d,
                                          BD=bd, SPLITS=splits, SP=_pow2(splits), H=h, INDIRECT=seqs is not None,
                                          num_warps=4)

    def _partials(self, b: int, h: int, splits: int, bd: int, device: torch.device):
        """Scratch for split-K partials, kept per shape: a CUDA graph captures these addresses, so they must
        outlive the capture (and must not be shared between graphs that could run concurrently; replays
        are sequential on one stream, so one buffer per shape is enough)."""
        if splits == 1:
            key: tuple = ("none", device)
            if key not in self._scratch:
                e = torch.empty(1, dtype=torch.float32, device=device)
                self._scratch[key] = (e, e, e)
            return self._scratch[key]
        key = (b, h, splits, bd, device)
        if key not in self._scratch:
            n = b * h * splits
            self._scratch[key] = (torch.empty(n * bd, dtype=torch.float32, device=device),
                                  torch.empty(n, dtype=torch.float32, device=device),
                                  torch.empty(n, dtype=torch.float32, device=device))
        return self._scratch[key]

    @staticmethod
    def _forward_partials(meta: AttentionMetadata, b: int, h: int, splits: int, bd: int, device: torch.device):
        """Split-K scratch for the single-token rows of one mixed forward, allocated by its first layer and
        kept in ``meta.extra`` for the others: the layers run one after another on one stream, so each one's
        merge has read the partials before the next layer writes them."""
        key = (b, h, splits, bd)
        kept = meta.extra.get("triton_single_partials")
        if kept is None or kept[0] != key:
            n = b * h * splits if splits > 1 else 1
            kept = (key, (torch.empty(n * bd, dtype=torch.float32, device=device),
                          torch.empty(n, dtype=torch.float32, device=device),
                          torch.empty(n, dtype=torch.float32, device=device)))
            meta.extra["triton_single_partials"] = kept
        return kept[1]

    def _prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float, out: torch.Tensor) -> None:
        block_m, tile_seq, tile_q0 = meta.extra["triton_tiles"]
        cfg = dict(PREFILL_CONFIG, BLOCK_M=block_m)
        h, d = q.shape[1], q.shape[2]
        kvh = k_cache.shape[2]
        _prefill_kernel[(tile_seq.shape[0], h)](
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_q, tile_seq, tile_q0, out,
            scale * LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            meta.block_tables.stride(0), out.stride(0), out.stride(1),
            G=h // kvh, D=d, BD=_pow2(d), PAGE=k_cache.shape[1], PREC=_precision(q.dtype), **cfg)
