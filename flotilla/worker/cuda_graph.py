"""CUDA graphs for decode batches: captured once per batch size of a ladder, replayed with padding.

Why: a decode step of a small batch is a few hundred short kernels; launched one by one from Python the
GPU idles between them (at batch size 1 an 8B model spends more time launching than reading weights).
A graph replays the whole step, LM head included, with one launch.

How: every input the step reads lives in a static device buffer (token ids, positions, KV slots, context
lengths, block tables) and the logits land in one static float32 buffer; a batch of ``n`` sequences
replays the graph of the smallest captured size ``>= n``. Padded rows get slot -1 (the Triton KV store
skips them) and context length 0 (the decode kernel reads nothing for them and writes zeros), so they
touch no real sequence. Every kernel in the graph is the one the eager path runs (the Triton backend's
decode split count depends only on the batch size's power-of-two bucket, which a graph bucket never
crosses), so replays match an eager forward of the same padded batch bit for bit.

Single-rank replicas capture, with an attention backend that declares ``graph_safe`` (Triton). DP-attention
layouts capture too when ``FLOTILLA_DP_ATTENTION_GRAPHS=1`` (opt-in: written for NCCL, not yet run on several
GPUs): every rank captures the same ladder, each graph runs the MLP through ``dp_attention_mlp`` with every
group padded to the graph's size (fixed-shape all-gather and reduce-scatter inside the graph); in a step
all ranks replay the bucket of the largest group's batch, and an idle group replays an empty batch of that
size, so the collectives line up. Whether every group can replay is agreed once per step (one small
all-gather over the attention-DP group), never per layer. MoE models capture when their layers run
the Triton fused MoE (routing and the per-expert sort on the device, buffers sized from the batch alone);
padded rows route like any token and their outputs are dropped. The fused MoE picks its tiles by the
power-of-two bucket of the batch, which a graph bucket shares with the eager forward of the same batch.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flotilla.distributed.dp_attention import dp_attention_mlp
from flotilla.ipc.messages import SeqPlan
from flotilla.worker.feed import feed_input_ids
from flotilla.model.attention import AttentionMetadata

if TYPE_CHECKING:
    from flotilla.worker.model_runner import ModelRunner

log = logging.getLogger(__name__)


def dp_replay_size(sizes: list[int], counts: list[int], can_replay: list[bool]) -> int | None:
    """The graph size every rank of a DP-attention layout replays this step (the bucket of the largest
    group's batch), or None when some group cannot replay (a prefill, or a batch beyond the ladder): then
    every rank runs eagerly. ``counts``/``can_replay``: per attention-DP group, identical on every rank."""
    if not all(can_replay):
        return None
    top = max(max(counts), 1)
    return next((b for b in sizes if b >= top), None)


def graph_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_bs`` (and ``max_bs`` itself).

    Every power of two up to ``max_bs`` is on the ladder, so the bucket of a batch never lies beyond the
    next power of two of its size (what keeps the decode split count equal between eager and replay).
    """
    sizes = [b for b in (1, 2, 4, 8) if b <= max_bs] + list(range(16, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class CudaGraphRunner:
    """Owns the static buffers and the captured graphs of one ModelRunner."""

    def __init__(self, runner: ModelRunner, max_bs: int, max_context: int, dp_size: int = 1):
        self.runner = runner
        self.dp_size = dp_size  # > 1: a DP-attention layout; the graphs hold its MLP collectives
        self.device = runner.device
        self.block_size = runner.block_size
        self.sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.max_blocks = -(-max_context // self.block_size)
        dev, n = self.device, self.max_bs
        # rows: token id, position, KV slot, context length (int64: one host->device copy per step)
        self.scalars = torch.zeros((4, n), dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=dev)
        self.bt_stage = torch.zeros(n * self.max_blocks, dtype=torch.int32, device=dev)
        self.cu_q = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.logits = torch.empty((n, runner.vocab_size), dtype=torch.float32, device=dev)
        self.host_scalars = torch.zeros((4, n), dtype=torch.int64, pin_memory=True)
        self.host_bt = torch.zeros(n * self.max_blocks, dtype=torch.int32, pin_memory=True)
        self._copied = torch.cuda.Event()  # the staging copies of the last step are done once this fires
        self._copied.record()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: Any = None
        self.lora = runner.lora  # LoRA: its kernels are captured, reading static segment buffers
        if self.lora is not None:
            self.lora.batch.graph_buffers(self.max_bs)

    # ------------------------------------------------------------------------------------------ capture
    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.scalars[2, :bs], cu_q=self.cu_q[: bs + 1], context_lens=self.scalars[3, :bs],
            block_tables=self.block_tables[:bs], q_lens_cpu=[1] * bs, context_lens_cpu=[0] * bs,
            block_size=self.block_size, max_q_len=1, max_context_len=self.max_blocks * self.block_size, is_decode=True)

    def _step(self, bs: int, meta: AttentionMetadata) -> None:
        model = self.runner.model
        if self.dp_size > 1:
            hidden = model(self.scalars[0, :bs], self.scalars[1, :bs], meta,
                           mlp_fn=dp_attention_mlp([bs] * self.dp_size, padded=True))
        else:
            hidden = model(self.scalars[0, :bs], self.scalars[1, :bs], meta)
        self.logits[:bs].copy_(model.compute_logits(hidden))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, all in one memory pool (a smaller graph reuses the larger
        one's activations, since replays never overlap)."""
        t0 = time.perf_counter()
        self.scalars.zero_()
        self.scalars[2].fill_(-1)  # capture runs must not write the KV cache
        if self.lora is not None:
            self.lora.batch.use_graph()  # every block empty: captured, computing nothing
        side = torch.cuda.Stream(self.device)
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: compiles Triton kernels, lets cuBLAS settle its choices
                for _ in range(2):
                    self._step(bs, meta)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._step(bs, meta)
            self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        if self.lora is not None:
            self.lora.batch.clear()
        log.info("captured %d CUDA graphs (batch sizes %s) in %.1fs", len(self.sizes), self.sizes,
                 time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------ replay
    def can_run(self, plans: list[SeqPlan]) -> bool:
        return 0 < len(plans) and self.can_run_local(plans)

    def can_run_local(self, plans: list[SeqPlan]) -> bool:
        """This rank's batch fits a graph (an empty batch does: with DP attention an idle group replays)."""
        return len(plans) <= self.max_bs and all(len(p.token_ids) == 1 for p in plans)

    def bucket(self, n: int) -> int:
        return next(b for b in self.sizes if b >= n)

    def run(self, plans: list[SeqPlan], bs: int | None = None, fed: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [sampled sequences, vocab] (float32) of a decode batch, replayed at size ``bs`` (default:
        the bucket of the batch; with DP attention the size all ranks agreed on, the batch may be empty).
        ``fed``: the previous step's sampled ids, for plans with ``prev_row`` (ModelRunner.forward).

        The result is a view of the static logits buffer: it is valid until the next replay (the worker
        samples from it before it schedules the next step).
        """
        n = len(plans)
        bs = bs or self.bucket(n)
        widths = [len(p.block_table) for p in plans]
        w = max(widths, default=0)
        self._copied.synchronize()  # the pinned staging buffers may be rewritten now
        hs = self.host_scalars.numpy()
        starts = np.fromiter((p.start for p in plans), dtype=np.int64, count=n)
        hs[0, :n] = np.fromiter((p.token_ids[0] for p in plans), dtype=np.int64, count=n)
        hs[1, :n] = starts
        hbt = self.host_bt.numpy()[: n * w].reshape(n, w)
        for i, p in enumerate(plans):
            hbt[i, : widths[i]] = p.block_table
        bs_ = self.block_size
        if n:
            hs[2, :n] = hbt[np.arange(n), starts // bs_].astype(np.int64) * bs_ + starts % bs_
        hs[3, :n] = starts + 1
        if bs > n:
            hs[0:2, n:bs] = 0
            hs[2, n:bs] = -1
            hs[3, n:bs] = 0
        self.scalars.copy_(self.host_scalars, non_blocking=True)  # 32 bytes a row: copy all, dense
        if n:
            self.bt_stage[: n * w].copy_(self.host_bt[: n * w], non_blocking=True)
        self._copied.record()
        if fed is not None:
            feed_input_ids(self.scalars[0, :n], plans, fed)
        if n:
            self.block_tables[:n, :w].copy_(self.bt_stage[: n * w].view(n, w))
        if self.lora is not None:
            self.lora.graph_rows(plans, bs)
        self.graphs[bs].replay()
        out = self.logits[:n]
        if not all(p.sample for p in plans):
            rows = [i for i, p in enumerate(plans) if p.sample]
            out = out[torch.tensor(rows, dtype=torch.long, device=self.device)]
        return out
