"""A replica's leader (rank 0 of an attention group: the scheduler, the sampler, the channels to the front
end) and ``apply_model_op``, the step where every rank of the group applies a model op together. The rank
loops (``worker.worker``'s, and ``worker.pipeline``'s with pipeline parallelism) drive them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch

from flotilla.config import EngineConfig
from flotilla.distributed import get_group
from flotilla.ipc.channel import connect
from flotilla.ipc.messages import (LORA_OPS, MODEL_OPS, AbortRequest, AddRequest, BatchPlan, CommitLora,
                                   CommitWeights, ControlDone, DestroyWeightSyncGroup, DiscardWeights,
                                   FlushCache, InitWeightSyncGroup, Pause, ReleaseMemory, Resume,
                                   ResumeMemory, Shutdown, StepOutput, StepStarted, TokenOutput, UnloadLora,
                                   UpdateWeights, WorkerReady, to_worker_decoder)
from flotilla.launch.worker_args import WorkerArgs
from flotilla.lora.slots import AdapterSlots
from flotilla.sampling import SamplingParams
from flotilla.worker.faults import StepFaults
from flotilla.worker.grammar import Grammars
from flotilla.worker.heartbeat import HeartbeatThread
from flotilla.worker.host_copy import HostCopy
from flotilla.worker.kv_cache import KVBlockManager
from flotilla.worker.model_runner import ModelRunner
from flotilla.worker.sampler import Sampler, SamplerOutput, SamplingBatch
from flotilla.worker.texts import ReplicaTexts
from flotilla.worker.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from flotilla.weights import rank as weights_rank

log = logging.getLogger(__name__)

# A leader's heartbeat thread sends a Heartbeat this often (the front end's liveness signal), and an idle leader
# reports its load (an empty StepOutput) this often.
HEARTBEAT_S = 1.0


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


class Leader:
    """Rank 0 of an attention group: the scheduler, the sampler and the channels to the front end."""

    def __init__(self, args: WorkerArgs, cfg: EngineConfig, runner: ModelRunner, out_ch):
        self.args, self.runner, self.out_ch = args, runner, out_ch
        max_len = min(cfg.max_model_len, runner.num_blocks * cfg.block_size)
        kv = KVBlockManager(runner.num_blocks, cfg.block_size, enable_prefix_cache=cfg.enable_prefix_caching)
        eos = eos_ids(cfg.model, cfg.hf_config)
        adapters = AdapterSlots(cfg.max_loras) if cfg.enable_lora else None
        for name, _path, lora_id, _version in args.lora_adapters if adapters is not None else ():
            adapters.register(name, lora_id)  # loaded before this replica started (replayed by every rank)
        self.sched = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, max_len, eos), kv,
                               adapters)
        self.grammars = Grammars(cfg.tokenizer or cfg.model, runner.vocab_size, eos)  # structured output
        self.texts = ReplicaTexts(cfg.tokenizer or cfg.model) if cfg.detokenize_in_replicas else None
        self.in_ch = connect("pull", args.in_addr, to_worker_decoder, args.keys, on_bad_frame=self._bad_frame)
        self.sampler = Sampler()
        self.faults = StepFaults(args.replica_id)  # test-only fault injection (inactive unless the env asks)
        self.steps = 0
        self.overlapped = 0  # steps left in flight while the next one was planned
        self.last_sent = time.monotonic()
        # control state: paused (no scheduling), KV released, model ops waiting for every rank to take them
        self.paused = self.released = False
        self.unanswered_pauses: list[int] = []  # op ids of pauses taken while a step was in flight
        self.model_ops: list = []
        self.weight_version = args.weight_version
        self.pipeline: Any = None  # with pp_size > 1: the pipeline loop's state (stage_forwards(), max_in_flight)
        out_ch.send(WorkerReady(args.replica_id, args.rank, os.getpid(), runner.num_blocks, cfg.block_size, max_len))
        self.beat = HeartbeatThread(args.replica_id, args.rank, args.out_addr, args.keys, HEARTBEAT_S).start()

    def next_plan(self, busy_elsewhere: bool, hold: bool = False, in_flight: bool = False, **schedule_kw):
        """Take the front end's messages, then schedule; returns (plan to share, batch or None).
        ``schedule_kw``: passed to ``Scheduler.schedule`` (pipeline micro-batches exclude what is in flight);
        ``hold``: schedule nothing this time (the pipeline drains before a model op); ``in_flight``: a step
        is still on the device (overlap), so a pause is answered only once it is reported (``settled``):
        when ``pause`` returns, no more tokens come."""
        wait_ms = 0 if ((self.sched.has_work() and not (self.paused or self.released)) or busy_elsewhere) else 50
        self.beat.idle()
        msgs = self.in_ch.recv_many(wait_ms)
        self.beat.busy()  # from here until the next visit: a step, or waiting on the group's collectives
        for msg in msgs:
            if isinstance(msg, AddRequest):
                self.add(msg)
            elif isinstance(msg, AbortRequest):
                self.sched.abort(msg.rid, msg.reason)
            elif isinstance(msg, FlushCache):
                self.sched.flush_prefix_cache()
            elif isinstance(msg, Pause):
                self.paused = True
                if in_flight:
                    self.unanswered_pauses.append(msg.op_id)
                else:
                    self.reply(msg.op_id, "pause")
            elif isinstance(msg, Resume):
                self.settled()  # the answers go out in the order the front end sent the calls
                self.paused = False
                self.reply(msg.op_id, "resume")
            elif isinstance(msg, MODEL_OPS):
                self.model_ops.append(msg)
            elif isinstance(msg, Shutdown):
                return BatchPlan([], kind="stop"), None
        op = self.model_ops[0] if self.model_ops else None
        batch = None if (self.paused or self.released or hold) else self.sched.schedule(**schedule_kw)
        if batch is None:
            return BatchPlan([], kind="idle", op=op), None
        self._announce(batch.seqs)
        return BatchPlan(batch.plans, op=op, lora_map=self.sched.lora_map(batch)), batch

    def _announce(self, seqs) -> None:
        """Tell the front end, before the forward, which requests run in a batch here for the first time: if
        this step kills the replica, that is the evidence that they were in it (poison accounting)."""
        new = [s for s in seqs if not s.announced]
        if not new:
            return
        for s in new:
            s.announced = True
        self.out_ch.send(StepStarted(self.args.replica_id, [s.rid for s in new]))
        if self.faults.active:
            self.faults.before_forward(seqs)

    def add(self, msg: AddRequest) -> None:
        """Queue a request, or fail it (finish_reason "error", reported with the next step) if it is one the
        worker cannot serve. Whatever is wrong with one request never ends the worker."""
        try:
            problem = self._check(msg)
            if problem is not None:
                self.sched.fail(msg.rid, problem)
                return
            # The front end validated it, and decoding ran SamplingParams' checks again; build it once more
            # here so a params object that changed after its checks (or a future decoder that skips them)
            # is refused now, not in the sampler mid-batch.
            sampling = SamplingParams(**msg.sampling.to_dict())
            if sampling.structured_output is not None and msg.rid not in self.sched.by_rid:
                self.grammars.add(msg.rid, sampling.structured_output, msg.output_ids)
            self.sched.add(msg.rid, msg.prompt_ids, sampling, msg.output_ids)
            if self.texts is not None and msg.rid in self.sched.by_rid:
                self.texts.add(msg.rid, msg.prompt_ids, msg.output_ids, sampling.stop, msg.held, msg.text_tail,
                               msg.text_len)
        except Exception as e:
            log.warning("replica %d: request %r refused: %s: %s", self.args.replica_id, msg.rid, type(e).__name__, e)
            self.grammars.drop(msg.rid)
            if msg.rid in self.sched.by_rid:  # a duplicate id: the error finishes it in the front end, end it here too
                self.sched.fail(msg.rid, f"request refused by the worker: {type(e).__name__}: {e}")
            else:
                self.sched.finished_outputs.append(TokenOutput(
                    msg.rid, [], True, "error", error=f"request refused by the worker: {type(e).__name__}: {e}"))

    def _check(self, msg: AddRequest) -> str | None:
        """Why this worker cannot serve ``msg``, or None. Token ids outside the vocabulary would make the
        forward itself fail (an embedding lookup out of range), and a forward failure ends the worker."""
        if not isinstance(msg.sampling, SamplingParams):
            return f"sampling: expected SamplingParams, got {type(msg.sampling).__name__}"
        vocab = self.runner.vocab_size
        for name, ids in (("prompt_ids", msg.prompt_ids), ("output_ids", msg.output_ids)):
            if ids and not (0 <= min(ids) and max(ids) < vocab):
                return f"{name}: token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}"
        return None

    def _bad_frame(self, data: bytes, error: Exception) -> None:
        """A frame from the front end failed to decode (the channel drops it). If it meant to add a request,
        fail that request, so its caller gets an error instead of waiting forever."""
        try:
            raw = msgspec.msgpack.decode(data)
        except Exception:
            return
        rid = raw.get("rid") if isinstance(raw, dict) and raw.get("type") == "AddRequest" else None
        if not isinstance(rid, str):
            return
        if rid in self.sched.by_rid:  # never fail a running request because of a broken duplicate
            log.warning("replica %d: undecodable AddRequest for running request %r ignored", self.args.replica_id, rid)
            return
        self.sched.finished_outputs.append(TokenOutput(rid, [], True, "error",
                                                       error=f"malformed request: {type(error).__name__}: {error}"))

    def finish_step(self, batch, logits) -> None:
        """Sample ``batch`` from ``logits`` and report its results (or, with no batch, what aborts and
        failures left to report): ``launch`` and ``collect`` in one go, the order without overlap."""
        self.collect(self.launch(batch, logits))

    def launch(self, batch, logits) -> "Launched | None":
        """Start sampling ``batch`` (its ids stay on the device) and advance the scheduler past it; the
        results are read by ``collect``. Masks and penalties read the host's token lists, so a batch with a
        constrained or penalised row is marked ``needs_sync``: it is collected before the next step is planned."""
        if batch is None:
            return None
        if self.faults.active:
            self.faults.on_step(self.steps + 1)
            self.faults.before_sample(batch.sampled)
        sampled = batch.sampled
        rids = [s.rid for s in sampled]
        constrained = self._mask(logits, rids) if self.grammars.matchers else []
        prompt = self.runner.take_prompt_logprobs() if self.runner.prompt_logprobs else None
        tokens, copy, values = self._sample(batch, logits)
        self.sched.advance(batch)
        needs_sync = bool(constrained) or any(_penalised(s.sampling) for s in sampled)
        return Launched(batch, tokens, copy, values, constrained, prompt, needs_sync)

    def collect(self, step: "Launched | None") -> None:
        """Read a launched step's sampled ids (waiting for that step only), record them, report."""
        if step is not None:
            batch = step.batch
            tokens, logprobs, top = step.values or _host_values(step.copy.wait(), batch.sampled)
            rids = [s.rid for s in batch.sampled]
            done = self.grammars.accept(step.constrained, tokens, rids) if step.constrained else None
            outputs = self.sched.record(batch, tokens, logprobs, top, grammar_done=done, prompt_logprobs=step.prompt)
            self.steps += 1
            self.beat.steps = self.steps
        else:
            outputs, self.sched.finished_outputs = self.sched.finished_outputs, []
        if self.grammars.matchers:
            for out in outputs:
                if out.finished:
                    self.grammars.drop(out.rid)
        now = time.monotonic()
        if outputs or now - self.last_sent > HEARTBEAT_S:
            self.report(outputs)

    def settle(self, pending: "Launched | None", launched: "Launched | None", overlap: bool) -> "Launched | None":
        """Collect what is due after a launch: the step before it, and the new one too unless it may stay in
        flight (overlap on and nothing in it needs the host's tokens). Returns the step left in flight."""
        keep = launched if overlap and launched is not None and not launched.needs_sync else None
        self.overlapped += keep is not None
        if pending is not None:
            self.collect(pending)
        if keep is None:
            self.collect(launched)
        return keep

    def settled(self) -> None:
        """No step is in flight any more (its outputs are reported): answer the pauses that waited for it."""
        for op_id in self.unanswered_pauses:
            self.reply(op_id, "pause")
        self.unanswered_pauses.clear()

    def report(self, outputs=None) -> None:
        if outputs and self.texts is not None:
            for rid in self.texts.apply(outputs):  # a stop string ended it: end it here too, now
                self.sched.end(rid, "stop")
                self.grammars.drop(rid)
        load = self.sched.load()
        load.num_steps = self.steps
        load.num_preemptions = self.sched.num_preemptions
        load.num_overlapped_steps = self.overlapped
        load.weight_version = self.weight_version
        if self.pipeline is not None:
            load.stage_forwards, load.max_in_flight = self.pipeline.stage_forwards(), self.pipeline.max_in_flight
        self.out_ch.send(StepOutput(self.args.replica_id, outputs or [], load))
        self.last_sent = time.monotonic()

    def heartbeat(self) -> None:
        """Called during a long weight load: keeps the load report fresh (liveness itself comes from the
        heartbeat thread, which beats through any step, however long)."""
        self.beat.busy()  # progress: the step age counts from here (step_timeout_s is for a step that hangs)
        if time.monotonic() - self.last_sent > HEARTBEAT_S:
            self.report()

    def reply(self, op_id: int, op: str, error: str | None = None) -> None:
        self.out_ch.send(ControlDone(self.args.replica_id, op_id, op, self.weight_version, error))

    def op_done(self, op, error: str | None) -> None:
        """Every rank applied (or failed) ``op``: update the bookkeeping, report, answer the front end."""
        self.model_ops.pop(0)
        if isinstance(op, (InitWeightSyncGroup, DestroyWeightSyncGroup)):  # no weights, KV or version change
            self.reply(op.op_id, "weight_sync_group", error)
            return
        if isinstance(op, UpdateWeights):  # staged only: the live weights did not change
            self.reply(op.op_id, "update_weights", error)
            return
        if isinstance(op, DiscardWeights):
            self.reply(op.op_id, "discard_weights", error)
            return
        if isinstance(op, LORA_OPS):
            self._lora_done(op, error)
            return
        if isinstance(op, CommitWeights):
            name = "update_weights"
            if op.flush_cache:  # even after a failure: a commit that failed may have written some parameters
                self.sched.drop_all_kv()
            if error is None:
                self.weight_version = op.version
        elif isinstance(op, ReleaseMemory):
            name = "release_memory"
            self.released = True  # even after a failure: some ranks may have freed their cache
            self.sched.drop_all_kv()
        else:
            name = "resume_memory"
            if error is None:
                self.released = False
        outputs, self.sched.finished_outputs = self.sched.finished_outputs, []
        self.report(outputs)  # the new weight version reaches stats() before the answer does
        self.reply(op.op_id, name, error)

    def _lora_done(self, op, error: str | None) -> None:
        """A LoRA op every rank applied (or failed): the scheduler's registry follows the ranks' adapters."""
        adapters = self.sched.adapters
        if error is None and adapters is not None:
            if isinstance(op, CommitLora):
                replaced = op.name in adapters.ids
                adapters.register(op.name, op.lora_id)
                if replaced:  # new weights: its running requests recompute their KV with them
                    self.sched.replace_adapter(op.name, op.lora_id)
            elif isinstance(op, UnloadLora):
                # the front end unloads once none of its requests is in flight; should one remain here, it ends
                # now, before a step could ask the ranks for the adapter they dropped
                for seq in [s for s in self.sched.by_rid.values() if s.lora == op.name]:
                    self.sched.fail(seq.rid, f"lora_name: adapter {op.name!r} was unloaded")
                adapters.unregister(op.name)
        self.reply(op.op_id, "unload_lora_adapter" if isinstance(op, UnloadLora) else "load_lora_adapter", error)

    def _mask(self, logits, rids: list[str]) -> list:
        """Apply the structured-output masks; a failure fails the constrained requests, never the worker."""
        try:
            with torch.inference_mode():
                return self.grammars.mask(logits, rids)
        except Exception as e:
            log.error("replica %d: structured-output masking failed: %s: %s", self.args.replica_id, type(e).__name__, e)
            for rid in rids:
                if rid in self.grammars.matchers:
                    self.grammars.drop(rid)
                    self.sched.fail(rid, f"structured output failed: {type(e).__name__}: {e}")
            return []

    def _sample(self, batch, logits):
        """Sample the batch's rows: (token ids on the device, a HostCopy of the sampler's output, None), or
        after a failure (None for the copy and) the host values. Only the leader samples (its TP peers are
        already on their way to the next plan), so a sampling error can be handled here without breaking the
        group's lockstep: if the batch fails, sample row by row, fail the requests whose rows still fail,
        and serve the others."""
        if not batch.sampled:  # every row a prefill chunk that samples nothing yet
            return torch.zeros(0, dtype=torch.int64, device=logits.device), None, ([], None, None)
        try:
            out = _draw(self.sampler, logits, batch.sampled, self.runner)
            return out.token_ids, HostCopy([out.token_ids, out.logprobs, out.top_ids, out.top_logprobs]), None
        except Exception as e:
            log.error("replica %d: sampling a batch failed (%s: %s); retrying row by row", self.args.replica_id,
                      type(e).__name__, e)
        tokens: list[int] = []
        rows: list[tuple[float | None, list | None]] = []
        for r, seq in enumerate(batch.sampled):
            try:
                out = _draw(self.sampler, logits[r:r + 1], [seq], self.runner)
                (tok,), lps, top = _host_values([out.token_ids, out.logprobs, out.top_ids, out.top_logprobs], [seq])
                tokens.append(tok)
                rows.append((lps[0] if lps is not None else None, top[0] if top is not None else None))
            except Exception as e:
                log.error("replica %d: request %r failed in sampling: %s: %s", self.args.replica_id, seq.rid,
                          type(e).__name__, e)
                self.sched.fail(seq.rid, f"sampling failed: {type(e).__name__}: {e}")
                tokens.append(0)  # never used: record() skips finished sequences but keeps rows aligned
                rows.append((None, None))
        logprobs = [lp or 0.0 for lp, _ in rows] if any(lp is not None for lp, _ in rows) else None
        top = [t or [] for _, t in rows] if any(t is not None for _, t in rows) else None
        device_tokens = torch.tensor(tokens, dtype=torch.int64).to(logits.device, non_blocking=True)
        return device_tokens, None, (tokens, logprobs, top)

    def close(self) -> None:
        self.beat.stop()
        self.in_ch.close()


def apply_model_op(args: WorkerArgs, runner: ModelRunner, op, leader: Leader | None) -> None:
    """Every rank of the group runs this in the same step; the leaders learn whether all ranks succeeded.

    Weight ops are ``flotilla.weights.rank``'s (stage, commit, discard; joining and leaving sync groups): each
    rank does its part, the group agrees on the outcome here, and when any rank failed every rank undoes its
    part (a staged update is dropped, a join is left), so a replica never serves a mix of old and new shards."""
    error = None
    try:
        if weights_rank.handles(op):
            weights_rank.run(op, runner, args.rank, args.replica_id, progress=leader.heartbeat if leader else None)
        elif isinstance(op, LORA_OPS):
            if runner.lora is None:
                raise RuntimeError("LoRA is off (enable_lora=False)")
            runner.lora.run(op)
        elif isinstance(op, ReleaseMemory):
            runner.release_memory(op.weights)
        elif isinstance(op, ResumeMemory):
            runner.resume_memory()
    except Exception as e:  # reported to the front end; the rank keeps serving
        error = f"rank {args.rank}: {type(e).__name__}: {e}"
        log.error("replica %d: %s failed: %s", args.replica_id, type(op).__name__, error)
    failed = [r for r, (f,) in enumerate(get_group("world").all_gather_ints([int(error is not None)])) if f]
    if failed and weights_rank.handles(op):
        weights_rank.undo(op)
    if failed and isinstance(op, LORA_OPS) and runner.lora is not None:
        runner.lora.undo(op)
    if leader is not None:
        if failed and error is None:
            error = f"rank(s) {failed} failed (see their logs)"
        leader.op_done(op, error)


class _RowIds:
    """``seqs[r].<attr>`` computed on access (a list-like of one id list per row)."""

    def __init__(self, seqs, attr: str):
        self.seqs, self.attr = seqs, attr

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, r: int) -> list[int]:
        return getattr(self.seqs[r], self.attr)


@dataclass
class Launched:
    """A step whose sampling was launched: its results may still be on the device."""

    batch: ScheduledBatch
    tokens: torch.Tensor              # [sampled rows] int64 on the device: what the next step is fed
    copy: HostCopy | None             # the sampler's output on its way to the host
    values: tuple | None              # (tokens, logprobs, top) already on the host (row-by-row sampling)
    constrained: list                 # structured-output rows, as Grammars.mask returned them
    prompt: dict | None               # prompt logprobs the forward computed
    needs_sync: bool                  # collect before planning the next step


def _penalised(sp: SamplingParams) -> bool:
    return sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0


def _draw(sampler: Sampler, logits: torch.Tensor, seqs: list, runner: ModelRunner) -> SamplerOutput:
    """Sample one token per sequence of ``seqs`` (row r of ``logits`` is ``seqs[r]``'s), on the device."""
    # Lazy views: the sampler reads a row's ids only for penalties or seeds, and slicing every prompt and
    # output on every step costs ~1 ms of host time at batch 256.
    sb = SamplingBatch.build([s.sampling for s in seqs], _RowIds(seqs, "prompt_ids"), _RowIds(seqs, "output_ids"),  # type: ignore[arg-type]
                             runner.vocab_size, logits.device)
    return sampler(logits, sb)


def _host_values(host: list, seqs: list):
    """(token ids, logprobs or None, top candidates or None) as lists, from the sampler's output tensors
    (token ids, logprobs, top ids, top logprobs) on the host."""
    token_ids, lp, top_ids, top_lps = host
    tokens = token_ids.tolist()
    logprobs = lp.tolist() if lp is not None else None
    top = None
    if top_ids is not None:
        ids, lps = top_ids.tolist(), top_lps.tolist()
        top = [[(i, v) for i, v in zip(ids[r][: s.sampling.top_logprobs], lps[r][: s.sampling.top_logprobs])]
               for r, s in enumerate(seqs)]
    return tokens, logprobs, top
