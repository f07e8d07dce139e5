"""Device tensors copied back to the host without waiting for the device to drain.

Why: ``tensor.tolist()`` on a CUDA tensor waits for everything queued on the stream, so a worker that has
already launched step N+1 would wait for N+1 before it could read step N's sampled ids. Copying into
pinned memory right after step N's sampling and recording an event there lets the host wait for exactly
that point of the stream. On the CPU every op has finished when it returns: nothing to copy.
"""

from __future__ import annotations

import torch


class HostCopy:
    """Host copies of ``tensors`` (None entries stay None), readable once ``wait`` returns."""

    def __init__(self, tensors: list[torch.Tensor | None]):
        self.event = None
        if not any(t is not None and t.is_cuda for t in tensors):
            self.host = tensors
            return
        self.host = []
        for t in tensors:
            if t is None or not t.is_cuda:
                self.host.append(t)
                continue
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # torch's caching host allocator
            h.copy_(t, non_blocking=True)
            self.host.append(h)
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self) -> list[torch.Tensor | None]:
        if self.event is not None:
            self.event.synchronize()
        return self.host
