"""The rank main loop. Rank 0 of a replica owns the scheduler and talks to the front end; the other
ranks receive each batch plan from rank 0 over torch.distributed and run the same forward.

Nothing here knows about Ray or multiprocessing: a launcher calls ``run_worker`` in whatever process it made.
The leader's side of each step (scheduling, sampling, reporting) is ``worker.leader``'s.
"""

from __future__ import annotations

import logging
import os
import traceback

import torch

from flotilla.config import EngineConfig
from flotilla.distributed import destroy_groups, get_group, init_groups
from flotilla.ipc.channel import connect
from flotilla.ipc.messages import BatchPlan, WorkerFailed, batch_plan_decoder, encoder, from_worker_decoder
from flotilla.launch.worker_args import WorkerArgs
from flotilla.worker import lifeline
from flotilla.worker.leader import Launched, Leader, apply_model_op
from flotilla.worker.model_runner import ModelRunner
from flotilla.worker.step_trace import StepTrace
from flotilla.weights import rank as weights_rank

log = logging.getLogger(__name__)


def run_worker(args: WorkerArgs, store=None) -> None:
    """Entry point of every rank process (or Ray actor). ``store``: a torch.distributed Store to rendezvous
    through instead of ``args.dist_init_method`` (the Ray launcher passes one)."""
    logging.basicConfig(level=os.environ.get("FLOTILLA_LOG_LEVEL", "WARNING"))
    # first: a front end that died while we started must not leave us running
    # (a rank forked from the mp launcher's fork server, args.env set, has the fork server for parent, which
    # exits with the front end: its death is the front end's)
    lifeline.install(args.parent_pid, args.private_dir, pdeathsig=args.pdeathsig,
                     via_fork_server=args.env is not None)
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
        init_groups(args.rank, args.world_size, args.dist_init_method, backend, attn_tp_size=attn_tp, store=store,
                    pp_size=cfg.pp_size)
        if get_group("attn_tp").rank == 0:
            out_ch = connect("push", args.out_addr, from_worker_decoder, args.keys)
        runner = ModelRunner(cfg, device)
        weights_rank.load_files(runner, args.weights_sources)  # updates made since the checkpoint
        if runner.lora is not None:
            for name, path, lora_id, version in args.lora_adapters:  # adapters loaded before this rank started
                runner.lora.load_now(name, path, lora_id, version)
        world = get_group("world")  # every rank of the group (all TP ranks; with pp, all stages) agrees
        num_blocks = min(v[0] for v in world.all_gather_ints([runner.plan_kv_blocks()]))
        runner.allocate_kv(num_blocks)
        if cfg.pp_size > 1:
            from flotilla.worker.pipeline import pipeline_rank_loop

            pipeline_rank_loop(args, cfg, runner, out_ch)
        else:
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


def _rank_loop(args: WorkerArgs, cfg: EngineConfig, runner: ModelRunner, out_ch) -> None:
    """Every rank runs this loop in lockstep with its group.

    The leader of each attention group schedules and shares its plan with its attention-TP peers. With DP
    attention, all attention groups then exchange their token counts: a group with nothing to do still
    runs an empty forward whenever another group works, so the MLP collectives line up; when no group
    has work, nobody runs a forward and the leaders wait on their sockets.

    Control operations that touch the model (weight updates, memory release) ride along in the plan until
    every rank has one: with DP attention each leader got its own copy from the front end, possibly in
    different steps, so the exchanged counts carry each group's pending op id and all ranks apply the op
    in the first step where every group holds the same one. No forward ever mixes old and new weights.
    """
    attn_tp, attn_dp = get_group("attn_tp"), get_group("attn_dp")
    leader = Leader(args, cfg, runner, out_ch) if attn_tp.rank == 0 else None
    busy_elsewhere = False
    overlap = cfg.enable_overlap_schedule
    fed = None  # overlap: the ids the last forward's rows sampled, on this rank's device (the next step's inputs)
    pending = None  # the leader's step still in flight (overlap)
    trace = StepTrace.from_env() if leader else None  # opt-in host-time profile of each step
    try:
        while True:
            if trace:
                trace.start()
            plan, batch = leader.next_plan(busy_elsewhere, in_flight=pending is not None) if leader else (None, None)
            if trace:
                trace.mark()
            if attn_tp.size > 1:
                payload = encoder.encode(plan) if leader else None
                plan = batch_plan_decoder.decode(attn_tp.broadcast_bytes(payload))
            counts = None
            op_id = plan.op.op_id if plan.op is not None else 0
            if attn_dp.size > 1:
                mine = sum(len(s.token_ids) for s in plan.seqs)
                shared = get_group("tp").all_gather_ints([mine, int(plan.kind == "stop"), op_id])
                if any(stop for _, stop, _ in shared):
                    return
                counts = [shared[a * attn_tp.size][0] for a in range(attn_dp.size)]
                busy_elsewhere = any(counts)
                run = busy_elsewhere
                apply_op = op_id != 0 and all(o == op_id for _, _, o in shared)
            else:
                if plan.kind == "stop":
                    return
                run = plan.kind == "forward"
                apply_op = op_id != 0
            # An exception in forward ends the worker (run_worker reports it): a rank cannot tell whether its
            # model, KV cache or collectives are still sane, nor whether its peers finished the same step.
            logits = runner.forward(plan.seqs, dp_counts=counts, fed=fed, lora_map=plan.lora_map) if run else None
            if trace:
                trace.mark()
            launched = leader.launch(batch, logits) if leader else None
            if overlap:
                fed = _share_sampled(attn_tp, plan, launched, runner.device) if run else None
            if trace:
                trace.mark()
            if leader:
                pending = leader.settle(pending, launched, overlap)
            if trace and run:
                trace.mark()
                trace.end(plan.seqs, runner.graphs is not None and runner.graphs.can_run(plan.seqs))
            if apply_op:
                if pending is not None:  # an op sees every result recorded (a weight update drops all KV)
                    leader.collect(pending)
                    pending = None
                apply_model_op(args, runner, plan.op, leader)
            if leader and pending is None:
                leader.settled()
    finally:
        if trace:
            trace.write()
        if leader:
            leader.close()


def _share_sampled(attn_tp, plan: BatchPlan, launched: "Launched | None", device: torch.device):
    """The ids this step sampled, on every rank of the attention group (the leader sampled them): the next
    step's fed inputs. A broadcast on the device's stream, so no rank waits for the step to finish."""
    n = sum(p.sample for p in plan.seqs)
    if n == 0:
        return None
    tokens = launched.tokens if launched is not None else torch.empty(n, dtype=torch.int64, device=device)
    return attn_tp.broadcast_tensor(tokens)
