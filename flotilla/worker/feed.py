"""Overlap scheduling's device-side half: step N+1's input ids taken from step N's sampled ids.

The scheduler plans step N+1 before the host has read step N's tokens; such a plan carries a placeholder id
and ``prev_row``, its row among step N's sampled ids, which never leave the device on the way in.
"""

from __future__ import annotations

import numpy as np
import torch

from flotilla.ipc.messages import SeqPlan


def feed_input_ids(input_ids: torch.Tensor, plans: list[SeqPlan], fed: torch.Tensor,
                   q_lens: list[int] | None = None) -> None:
    """Overwrite the placeholder input id of every plan with ``prev_row`` >= 0 by ``fed[prev_row]``, on the
    device (the index lists are host data: two small copies, no sync). ``q_lens``: the tokens of each plan in
    ``input_ids`` (default: one each, a decode batch)."""
    dst: list[int] = []
    src: list[int] = []
    offset = 0
    for i, p in enumerate(plans):
        if p.prev_row >= 0:
            dst.append(offset)  # a fed plan computes exactly one token
            src.append(p.prev_row)
        offset += q_lens[i] if q_lens is not None else 1
    if not dst:
        return
    dev = input_ids.device
    d = torch.from_numpy(np.asarray(dst, dtype=np.int64)).to(dev, non_blocking=True)
    s = torch.from_numpy(np.asarray(src, dtype=np.int64)).to(dev, non_blocking=True)
    input_ids.index_copy_(0, d, fed.index_select(0, s).to(input_ids.dtype))
