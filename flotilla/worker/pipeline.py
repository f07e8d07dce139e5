"""The rank loop with pipeline parallelism (pp_size > 1).

Rank 0 (stage 0, tp-rank 0) leads: it schedules micro-batches, shares each plan with its stage's TP peers,
runs stage 0, and pushes plan and hidden states to stage 1; every rank of stage s + 1 receives them from its
counterpart in stage s (no broadcast between stages). The last stage's tp-rank 0 sends the sampled rows'
logits back to rank 0, which samples and advances the scheduler.

Up to pp_size micro-batches are in flight at once, so every stage works at the same time. A sequence in
flight in one micro-batch is excluded from the next until its token is back. Model ops (weight updates,
memory release) wait until the pipeline is empty, then flow down it in an idle plan. Idle plans otherwise
go down only now and then (keeping the receivers within torch.distributed's timeout); a stop drains the
pipeline, then flows down it.
"""

from __future__ import annotations

import time
from collections import deque

from flotilla.config import EngineConfig
from flotilla.distributed import get_group
from flotilla.distributed.pipeline import StageLink
from flotilla.ipc.messages import batch_plan_decoder, encoder
from flotilla.worker.model_runner import ModelRunner
from flotilla.launch.worker_args import WorkerArgs
from flotilla.worker.leader import Leader, apply_model_op

IDLE_PING_S = 1.0  # an idle leader still sends an idle plan down the pipeline this often


class _PipelineStats:
    def __init__(self, link: StageLink):
        self.link = link
        self.max_in_flight = 0

    def stage_forwards(self) -> list[int]:
        return self.link.stage_forwards()


def pipeline_rank_loop(args: WorkerArgs, cfg: EngineConfig, runner: ModelRunner, out_ch) -> None:
    tp, pp = get_group("tp"), get_group("pp")
    link = StageLink(args.rank, tp.size, pp.size, runner.hf_config.hidden_size, runner.dtype)
    if args.rank == 0:
        _lead(args, cfg, runner, out_ch, link)
    else:
        _follow(args, runner, link)


def _lead(args: WorkerArgs, cfg: EngineConfig, runner: ModelRunner, out_ch, link: StageLink) -> None:
    tp, num_stages = get_group("tp"), get_group("pp").size
    leader = Leader(args, cfg, runner, out_ch)
    stats = leader.pipeline = _PipelineStats(link)
    sched = leader.sched
    inflight: deque = deque()   # scheduled batches whose logits are not back yet, oldest first
    last_sent = 0.0

    def issue(plan) -> None:
        nonlocal last_sent
        payload = encoder.encode(plan)
        if tp.size > 1:
            tp.broadcast_bytes(payload)
        hidden = None
        if plan.kind == "forward":
            hidden = runner.forward_stage(plan.seqs, None, plan.lora_map)
            link.own_forwards += 1
        link.send_next(payload, hidden)
        last_sent = time.monotonic()

    def retire_oldest() -> None:
        logits = link.recv_logits()
        leader.finish_step(inflight.popleft(), logits)

    try:
        while True:
            batch = None
            if len(inflight) < num_stages:
                active = len(sched.running) + len(sched.waiting)
                max_seqs = max(1, -(-active // num_stages))   # split the work evenly over the stages
                exclude = {s.rid for b in inflight for s in b.seqs}
                plan, batch = leader.next_plan(bool(inflight), hold=bool(leader.model_ops),
                                               exclude=exclude, max_seqs=max_seqs)
                if plan.op is not None and (inflight or batch is not None):
                    plan.op = None  # the op waits (in leader.model_ops) until the pipeline is empty
                if plan.kind == "stop":
                    while inflight:
                        retire_oldest()
                    issue(plan)
                    link.sends.drain()
                    return
                if batch is not None or plan.op is not None or \
                        (not inflight and time.monotonic() - last_sent > IDLE_PING_S):
                    issue(plan)
                if batch is not None:
                    inflight.append(batch)
                    stats.max_in_flight = max(stats.max_in_flight, len(inflight))
                if plan.op is not None:
                    apply_model_op(args, runner, plan.op, leader)
                    continue
            if inflight and (len(inflight) >= num_stages or batch is None):
                retire_oldest()
            elif not inflight and batch is None:
                leader.finish_step(None, None)  # heartbeat, outputs of aborts
    finally:
        leader.close()


def _follow(args: WorkerArgs, runner: ModelRunner, link: StageLink) -> None:
    tp, pp = get_group("tp"), get_group("pp")
    first, last = pp.rank == 0, pp.rank == pp.size - 1
    while True:
        if first:  # a TP peer of the leader
            payload, hidden_in = tp.broadcast_bytes(None), None
        else:
            payload, hidden_in = link.recv_prev()
        plan = batch_plan_decoder.decode(payload)
        out = None
        if plan.kind == "forward":
            out = runner.forward_stage(plan.seqs, hidden_in, plan.lora_map)
            link.own_forwards += 1
        if not last:
            link.send_next(payload, out)
        elif out is not None and tp.rank == 0:
            link.send_logits(out)
        if plan.kind == "stop":
            link.sends.drain()
            return
        if plan.op is not None:
            apply_model_op(args, runner, plan.op, None)
