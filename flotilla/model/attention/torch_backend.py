"""Reference paged attention in plain torch: runs anywhere, used on CPU and as the GPU backends' oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flotilla.model.attention.metadata import AttentionMetadata


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K and V. Caches are [num_blocks, block_size, kv_heads, head_dim], in the model's
    dtype or an FP8 one (``kv_cache_dtype``): values are cast on the way in (unscaled; e4m3 saturates at +-448)."""
    for cache, new in ((k_cache, k), (v_cache, v)):
        flat = cache.view(-1, *cache.shape[2:])
        if cache.dtype == new.dtype:
            flat.index_copy_(0, slot_mapping, new)
        else:  # index_copy_ has no FP8 kernels: copy the bytes
            flat.view(torch.uint8).index_copy_(0, slot_mapping, new.to(cache.dtype).view(torch.uint8))


class TorchAttention:
    name = "torch"

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """q: [T, heads, dim] -> [T, heads, dim]; the new K/V are already in the cache."""
        out = torch.empty_like(q)
        bs = meta.block_size
        heads, kv_heads = q.shape[1], k_cache.shape[2]
        q_start = 0
        for i, (q_len, ctx) in enumerate(zip(meta.q_lens_cpu, meta.context_lens_cpu)):
            if q_len == 0:
                continue
            n_blocks = (ctx + bs - 1) // bs
            blocks = meta.block_tables[i, :n_blocks].long()
            k = k_cache[blocks].flatten(0, 1)[:ctx].to(q.dtype)  # an FP8 cache is read back in q's dtype
            v = v_cache[blocks].flatten(0, 1)[:ctx].to(q.dtype)
            qi = q[q_start:q_start + q_len]
            if kv_heads != heads:
                k = k.repeat_interleave(heads // kv_heads, dim=1)
                v = v.repeat_interleave(heads // kv_heads, dim=1)
            mask = None
            if q_len > 1:
                q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
                mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(qi.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                               attn_mask=mask, scale=scale)
            out[q_start:q_start + q_len] = o.transpose(0, 1)
            q_start += q_len
        return out
