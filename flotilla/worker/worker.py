"""The rank main loop. Rank 0 of a replica owns the scheduler and talks to the front end; the other
ranks receive each batch plan from rank 0 over torch.distributed and run the same forward.

Nothing here knows about Ray or multiprocessing: a launcher calls ``run_worker`` in whatever process it made.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from flotilla.config import EngineConfig
from flotilla.distributed import destroy_groups, get_group, init_groups
from flotilla.ipc.channel import CurveKeys, connect
from flotilla.ipc.messages import (AbortRequest, AddRequest, BatchPlan, FlushCache, Shutdown, StepOutput,
                                   WorkerFailed, WorkerReady, batch_plan_decoder, encoder, from_worker_decoder,
                                   to_worker_decoder)
from flotilla.worker.kv_cache import KVBlockManager
from flotilla.worker.model_runner import ModelRunner
from flotilla.worker.sampler import Sampler, SamplingBatch
from flotilla.worker.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # an idle replica still reports its load this often (the front end's liveness signal)


@dataclass
class WorkerArgs:
    config: dict
    replica_id: int
    rank: int
    world_size: int
    dist_init_method: str | None
    in_addr: str
    out_addr: str
    keys: CurveKeys | None = None
    device_index: int | None = None
    num_threads: int | None = None
    backend: str | None = None


def eos_ids(model_path: str, hf_config: dict) -> tuple[int, ...]:
    ids: set[int] = set()
    sources = [hf_config]
    gen = Path(model_path) / "generation_config.json"
    if gen.is_file():
        try:
            sources.append(json.loads(gen.read_text()))
        except json.JSONDecodeError:
            pass
    for src in sources:
        e = src.get("eos_token_id")
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, list):
            ids.update(int(x) for x in e)
    return tuple(sorted(ids))


def run_worker(args: WorkerArgs, store=None) -> None:
    """Entry point of every rank process (or Ray actor). ``store``: a torch.distributed Store to rendezvous
    through instead of ``args.dist_init_method`` (the Ray launcher passes one)."""
    logging.basicConfig(level=os.environ.get("FLOTILLA_LOG_LEVEL", "WARNING"))
    out_ch = None
    try:
        cfg = EngineConfig(**args.config)
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        if cfg.device == "cuda":
            if args.device_index is not None:
                torch.cuda.set_device(args.device_index)
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        backend = args.backend or ("nccl" if device.type == "cuda" else "gloo")
        attn_tp = cfg.tp_size // cfg.dp_size if cfg.enable_dp_attention else cfg.tp_size
        init_groups(args.rank, args.world_size, args.dist_init_method, backend, attn_tp_size=attn_tp, store=store)
        if get_group("attn_tp").rank == 0:
            out_ch = connect("push", args.out_addr, from_worker_decoder, args.keys)
        runner = ModelRunner(cfg, device)
        tp = get_group("tp")
        num_blocks = min(v[0] for v in tp.all_gather_ints([runner.plan_kv_blocks()]))
        runner.allocate_kv(num_blocks)
        _rank_loop(args, cfg, runner, out_ch)
    except BaseException as e:  # report, then die: the launcher notices the exit
        msg = f"replica {args.replica_id} rank {args.rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        log.error(msg)
        if out_ch is not None:
            try:
                out_ch.send(WorkerFailed(args.replica_id, args.rank, msg))
            except Exception:
                pass
        raise SystemExit(1)
    finally:
        if out_ch is not None:
            out_ch.close()
        destroy_groups()


class _Leader:
    """Rank 0 of an attention group: the scheduler, the sampler and the channels to the front end."""

    def __init__(self, args: WorkerArgs, cfg: EngineConfig, runner: ModelRunner, out_ch):
        self.args, self.runner, self.out_ch = args, runner, out_ch
        self.in_ch = connect("pull", args.in_addr, to_worker_decoder, args.keys)
        max_len = min(cfg.max_model_len, runner.num_blocks * cfg.block_size)
        kv = KVBlockManager(runner.num_blocks, cfg.block_size, enable_prefix_cache=cfg.enable_prefix_caching)
        self.sched = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, max_len,
                                               eos_ids(cfg.model, cfg.hf_config)), kv)
        self.sampler = Sampler()
        self.steps = 0
        self.last_sent = time.monotonic()
        out_ch.send(WorkerReady(args.replica_id, args.rank, os.getpid(), runner.num_blocks, cfg.block_size, max_len))

    def next_plan(self, busy_elsewhere: bool):
        """Take the front end's messages, then schedule; returns (plan to share, batch or None)."""
        wait_ms = 0 if (self.sched.has_work() or busy_elsewhere) else 50
        for msg in self.in_ch.recv_many(wait_ms):
            if isinstance(msg, AddRequest):
                self.sched.add(msg.rid, msg.prompt_ids, msg.sampling, msg.output_ids)
            elif isinstance(msg, AbortRequest):
                self.sched.abort(msg.rid, msg.reason)
            elif isinstance(msg, FlushCache):
                self.sched.flush_prefix_cache()
            elif isinstance(msg, Shutdown):
                return BatchPlan([], kind="stop"), None
        batch = self.sched.schedule()
        if batch is None:
            return BatchPlan([], kind="idle"), None
        return BatchPlan(batch.plans), batch

    def finish_step(self, batch, logits) -> None:
        if batch is not None:
            outputs = self.sched.process(batch, *_sample(self.sampler, logits, batch, self.runner))
            self.steps += 1
        else:
            outputs, self.sched.finished_outputs = self.sched.finished_outputs, []
        now = time.monotonic()
        if outputs or now - self.last_sent > HEARTBEAT_S:
            load = self.sched.load()
            load.num_steps = self.steps
            load.num_preemptions = self.sched.num_preemptions
            self.out_ch.send(StepOutput(self.args.replica_id, outputs, load))
            self.last_sent = now

    def close(self) -> None:
        self.in_ch.close()


def _rank_loop(args: WorkerArgs, cfg: EngineConfig, runner: ModelRunner, out_ch) -> None:
    """Every rank runs this loop in lockstep with its group.

    The leader of each attention group schedules and shares its plan with its attention-TP peers. With DP
    attention, all attention groups then exchange their token counts: a group with nothing to do still
    runs an empty forward whenever another group works, so the MLP collectives line up; when no group
    has work, nobody runs a forward and the leaders wait on their sockets.
    """
    attn_tp, attn_dp = get_group("attn_tp"), get_group("attn_dp")
    leader = _Leader(args, cfg, runner, out_ch) if attn_tp.rank == 0 else None
    busy_elsewhere = False
    try:
        while True:
            plan, batch = leader.next_plan(busy_elsewhere) if leader else (None, None)
            if attn_tp.size > 1:
                payload = encoder.encode(plan) if leader else None
                plan = batch_plan_decoder.decode(attn_tp.broadcast_bytes(payload))
            counts = None
            if attn_dp.size > 1:
                mine = sum(len(s.token_ids) for s in plan.seqs)
                shared = get_group("tp").all_gather_ints([mine, int(plan.kind == "stop")])
                if any(stop for _, stop in shared):
                    return
                counts = [shared[a * attn_tp.size][0] for a in range(attn_dp.size)]
                busy_elsewhere = any(counts)
                run = busy_elsewhere
            else:
                if plan.kind == "stop":
                    return
                run = plan.kind == "forward"
            logits = runner.forward(plan.seqs, dp_counts=counts) if run else None
            if leader:
                leader.finish_step(batch, logits)
    finally:
        if leader:
            leader.close()


def _sample(sampler: Sampler, logits: torch.Tensor, batch, runner: ModelRunner):
    seqs = batch.sampled
    if not seqs:
        return [], None, None
    sb = SamplingBatch.build([s.sampling for s in seqs], [s.prompt_ids for s in seqs], [s.output_ids for s in seqs],
                             runner.vocab_size, logits.device)
    out = sampler(logits, sb)
    tokens = out.token_ids.tolist()
    logprobs = top = None
    if out.logprobs is not None:
        logprobs = out.logprobs.tolist()
    if out.top_ids is not None:
        ids, lps = out.top_ids.tolist(), out.top_logprobs.tolist()
        top = [[(i, lp) for i, lp in zip(ids[r][: s.sampling.top_logprobs], lps[r][: s.sampling.top_logprobs])]
               for r, s in enumerate(seqs)]
    return tokens, logprobs, top
