"""Pipeline parallelism: which decoder layers a stage owns, and the point-to-point messages between stages.

A group of pp x tp ranks is laid out rank = stage * tp + tp_rank. Rank (s, r) sends every plan (and, for a
forward, the hidden states after its layers) to rank (s + 1, r); the last stage's tp-rank 0 sends the
logits of the sampled rows back to the group's rank 0, which samples. Sends are non-blocking (``isend``):
their handles are kept and waited on later, so the leader pushing micro-batch k+1 down the pipeline while
the last stage pushes the logits of micro-batch k back can never deadlock.

Every message starts with a fixed-size int64 header, so the receiver knows what follows:
``[plan bytes, rows, columns, forwards of stage 0, ..., forwards of stage pp-1]`` (forward counts are a
debug statistic each stage fills in as a plan passes it; the leader reports them).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

PLAN_TAG = 11
LOGITS_TAG = 12


@dataclass(frozen=True)
class StageInfo:
    stage: int
    num_stages: int
    start: int   # first decoder layer of the stage
    end: int     # one past its last

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


def partition_layers(num_layers: int, pp_size: int, partition: list[int] | None = None) -> list[tuple[int, int]]:
    """[start, end) of each stage's layers: ``partition`` (layers per stage) or an even split, the earlier
    stages taking one more layer when it does not divide."""
    if pp_size < 1:
        raise ValueError(f"pp_size: must be >= 1, got {pp_size}")
    if num_layers < pp_size:
        raise ValueError(f"pp_size: the model has {num_layers} decoder layers, fewer than pp_size={pp_size} stages")
    if partition is None:
        base, extra = divmod(num_layers, pp_size)
        partition = [base + (1 if s < extra else 0) for s in range(pp_size)]
    if len(partition) != pp_size or any(n < 1 for n in partition) or sum(partition) != num_layers:
        raise ValueError(f"pp_layer_partition: {partition} must hold pp_size={pp_size} counts >= 1 summing to "
                         f"{num_layers} layers")
    bounds, start = [], 0
    for n in partition:
        bounds.append((start, start + n))
        start += n
    return bounds


def stage_info(stage: int, num_layers: int, pp_size: int, partition: list[int] | None = None) -> StageInfo:
    start, end = partition_layers(num_layers, pp_size, partition)[stage]
    return StageInfo(stage, pp_size, start, end)


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class PendingSends:
    """Handles of non-blocking sends, with the tensors they read kept alive until they complete."""

    def __init__(self, limit: int = 16):
        self.limit = limit
        self.pending: deque = deque()

    def add(self, works: list, tensors: list[torch.Tensor]) -> None:
        self.pending.append((works, tensors))
        while self.pending and (len(self.pending) > self.limit or all(w.is_completed() for w in self.pending[0][0])):
            for w in self.pending.popleft()[0]:
                w.wait()

    def drain(self) -> None:
        while self.pending:
            for w in self.pending.popleft()[0]:
                w.wait()


class StageLink:
    """This rank's point-to-point traffic: plans and hidden states in from the previous stage and out to the
    next, logits from the last stage to the leader."""

    def __init__(self, rank: int, tp_size: int, pp_size: int, hidden_size: int, dtype: torch.dtype):
        self.rank, self.tp, self.pp = rank, tp_size, pp_size
        self.stage, self.tp_rank = divmod(rank, tp_size)
        self.hidden_size, self.dtype = hidden_size, dtype
        self.device = _device()
        self.sends = PendingSends(limit=4 * pp_size + 4)
        self.forwards = [0] * pp_size   # forward counts of every stage, as last seen (a debug statistic)
        self.own_forwards = 0           # this stage's forwards (counted by the caller)

    @property
    def prev_rank(self) -> int:
        return self.rank - self.tp

    @property
    def next_rank(self) -> int:
        return self.rank + self.tp

    def _header(self, plan_len: int, rows: int, cols: int) -> torch.Tensor:
        forwards = list(self.forwards)
        forwards[self.stage] = self.own_forwards
        return torch.tensor([plan_len, rows, cols, *forwards], dtype=torch.int64, device=self.device)

    def stage_forwards(self) -> list[int]:
        forwards = list(self.forwards)
        forwards[self.stage] = self.own_forwards
        return forwards

    def send_next(self, payload: bytes, hidden: torch.Tensor | None) -> None:
        """Plan bytes (and the hidden states of a forward) to the same TP rank of the next stage."""
        rows = 0 if hidden is None else hidden.shape[0]
        header = self._header(len(payload), rows, 0 if hidden is None else hidden.shape[1])
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        tensors = [header, buf]
        if hidden is not None:
            tensors.append(hidden.contiguous())
        works = [dist.isend(t, self.next_rank, tag=PLAN_TAG) for t in tensors if t.numel() or t is header]
        self.sends.add(works, tensors)

    def recv_prev(self) -> tuple[bytes, torch.Tensor | None]:
        header = torch.empty(3 + self.pp, dtype=torch.int64, device=self.device)
        dist.recv(header, self.prev_rank, tag=PLAN_TAG)
        plan_len, rows, cols, *forwards = header.tolist()
        self.forwards = forwards
        buf = torch.empty(plan_len, dtype=torch.uint8, device=self.device)
        if plan_len:
            dist.recv(buf, self.prev_rank, tag=PLAN_TAG)
        hidden = None
        if cols:
            hidden = torch.empty((rows, cols), dtype=self.dtype, device=self.device)
            if rows:
                dist.recv(hidden, self.prev_rank, tag=PLAN_TAG)
        return bytes(buf.cpu().numpy()), hidden

    def send_logits(self, logits: torch.Tensor) -> None:
        """Last stage, tp-rank 0: the sampled rows' logits (float32) to the group's rank 0."""
        header = self._header(0, logits.shape[0], logits.shape[1])
        logits = logits.contiguous()
        works = [dist.isend(header, 0, tag=LOGITS_TAG)]
        if logits.numel():
            works.append(dist.isend(logits, 0, tag=LOGITS_TAG))
        self.sends.add(works, [header, logits])

    def recv_logits(self) -> torch.Tensor:
        """Rank 0: the logits of the oldest micro-batch in flight."""
        header = torch.empty(3 + self.pp, dtype=torch.int64, device=self.device)
        dist.recv(header, self.pp * self.tp - self.tp, tag=LOGITS_TAG)
        _, rows, cols, *forwards = header.tolist()
        self.forwards = forwards
        logits = torch.empty((rows, cols), dtype=torch.float32, device=self.device)
        if logits.numel():
            dist.recv(logits, self.pp * self.tp - self.tp, tag=LOGITS_TAG)
        return logits
