"""Continuous batching with chunked prefill and preemption by recompute.

Each step packs, within ``max_num_batched_tokens``: one token for every decoding sequence, the next
chunk of every sequence still in prefill, then new sequences from the queue while pages and
``max_num_seqs`` allow. When the pool cannot hold the next token of a running sequence, the most
recently admitted one gives its pages back and returns to the head of the queue to be recomputed
later (its finished pages usually survive in the prefix cache, so the recompute is cheap).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from flotilla.ipc.messages import ReplicaLoad, SeqPlan, TokenOutput
from flotilla.worker.kv_cache import KVBlockManager
from flotilla.worker.sequence import Sequence


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    plans: list[SeqPlan]

    @property
    def sampled(self) -> list[Sequence]:
        return [s for s, p in zip(self.seqs, self.plans) if p.sample]


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVBlockManager):
        self.cfg = cfg
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_rid: dict[str, Sequence] = {}
        self._arrivals = 0
        self.num_preemptions = 0
        self.finished_outputs: list[TokenOutput] = []  # aborted / failed outside a step, flushed with the next step

    # ------------------------------------------------------------------------------------------ requests
    def add(self, rid: str, prompt_ids: list[int], sampling, output_ids: list[int] | None = None) -> None:
        output_ids = list(output_ids or [])
        if rid in self.by_rid:
            # The front end holds one request per id, and this error finishes it: end the running copy too,
            # so no sequence keeps generating for a request the front end considers finished.
            self.fail(rid, f"duplicate request id {rid!r}: a request with this id was already running here")
            return
        if not prompt_ids:  # nothing to compute a first token from (the caller fails the request)
            raise ValueError("prompt_ids: must not be empty")
        tokens = list(prompt_ids) + output_ids
        if len(tokens) > self.cfg.max_model_len or len(tokens) > self.kv.num_blocks * self.kv.block_size:
            self.finished_outputs.append(TokenOutput(
                rid, [], True, "error",
                error=f"prompt: {len(tokens)} tokens exceed this replica's limit of {self.cfg.max_model_len}"))
            return
        seq = Sequence(rid, tokens, len(prompt_ids), sampling, self._arrivals, num_outputs_at_start=len(output_ids))
        self._arrivals += 1
        self.by_rid[rid] = seq
        self.waiting.append(seq)

    def abort(self, rid: str, reason: str = "abort") -> None:
        seq = self.by_rid.get(rid)
        if seq is None:
            return
        self._finish(seq, reason)
        self.finished_outputs.append(TokenOutput(rid, [], True, reason, cached_tokens=max(seq.cached_tokens, 0)))

    def fail(self, rid: str, error: str) -> None:
        """End a queued or running request with finish_reason "error" (reported with the next step)."""
        seq = self.by_rid.get(rid)
        cached = max(seq.cached_tokens, 0) if seq is not None else 0
        if seq is not None:
            self._finish(seq, "error")
        self.finished_outputs.append(TokenOutput(rid, [], True, "error", cached_tokens=cached, error=error))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def flush_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    def drop_all_kv(self) -> None:
        """Forget every page of KV: running sequences go back to the queue (in arrival order) to recompute
        theirs, and the prefix cache is emptied. After a weight update no KV of the old weights survives;
        before the KV cache is freed, nothing points into it any more."""
        for seq in sorted(self.running, key=lambda s: s.arrival, reverse=True):
            self._preempt(seq)
        for seq in self.waiting:  # a queued sequence may hold prefix pages matched at an earlier admission try
            if seq.block_table:
                self.kv.release(seq.block_table)
                seq.block_table, seq.num_computed = [], 0
        self.kv.reset_prefix_cache()

    # ------------------------------------------------------------------------------------------ schedule
    def schedule(self, exclude: set[str] | None = None, max_seqs: int | None = None) -> ScheduledBatch | None:
        """The next batch. ``exclude``: rids in flight in another (pipeline) micro-batch, neither scheduled nor
        preempted until their results are processed. ``max_seqs``: at most this many sequences in the batch."""
        exclude = exclude or frozenset()
        limit = max_seqs or self.cfg.max_num_seqs
        budget = self.cfg.max_num_batched_tokens
        seqs: list[Sequence] = []
        plans: list[SeqPlan] = []
        # Running sequences first, oldest first, so preemption hits the newest.
        self.running.sort(key=lambda s: s.arrival)
        i = 0
        while i < len(self.running) and budget > 0 and len(seqs) < limit:
            seq = self.running[i]
            if seq.rid in exclude:
                i += 1
                continue
            n = min(seq.remaining_prefill, budget)
            if not self._grow(seq, seq.num_computed + n):
                # never a sequence in flight elsewhere (a later stage still writes its pages) or in this batch
                victim = next((v for v in reversed(self.running) if v.rid not in exclude and v not in seqs), None)
                if victim is None:
                    break
                self._preempt(victim)
                if victim is seq:
                    break
                continue
            seqs.append(seq)
            plans.append(self._plan(seq, n))
            budget -= n
            i += 1
        # Then new sequences, while there is room. A sequence whose first page equals one this batch computes
        # (the choices of one prompt, or a burst with one system prompt) waits a step: once that prefill has
        # published its pages, it takes them from the prefix cache instead of computing them again.
        page = self.kv.block_size
        share = self.kv.enable_prefix_cache
        prefilling = {tuple(s.tokens[:page]) for s, p in zip(seqs, plans)
                      if share and p.start < page and len(s.tokens) > page}
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs and len(seqs) < limit:
            seq = self.waiting[0]
            if prefilling and len(seq.tokens) > page and tuple(seq.tokens[:page]) in prefilling \
                    and seq.sampling.prompt_logprobs is None:
                deferred.append(self.waiting.popleft())
                continue
            if not seq.block_table:
                # prompt logprobs are computed by the forward, so such a prompt is computed whole
                blocks, cached = ([], 0) if seq.sampling.prompt_logprobs is not None else \
                    self.kv.match_prefix(seq.tokens)
                seq.block_table, seq.num_computed = blocks, cached
                if seq.cached_tokens < 0:
                    seq.cached_tokens = cached
            n = min(seq.remaining_prefill, budget)
            if not self._grow(seq, seq.num_computed + n):
                self.kv.release(seq.block_table)
                seq.block_table, seq.num_computed = [], 0
                break
            self.waiting.popleft()
            self.running.append(seq)
            seqs.append(seq)
            plans.append(self._plan(seq, n))
            budget -= n
            if share and plans[-1].start < page and len(seq.tokens) > page:
                prefilling.add(tuple(seq.tokens[:page]))
        self.waiting.extendleft(reversed(deferred))
        if not seqs:
            return None
        return ScheduledBatch(seqs, plans)

    def _plan(self, seq: Sequence, n: int) -> SeqPlan:
        start = seq.num_computed
        plan = SeqPlan(seq.tokens[start:start + n], start, list(seq.block_table), start + n == len(seq.tokens))
        k = seq.sampling.prompt_logprobs
        if k is not None and start + 1 < seq.prompt_len:  # positions whose next token is still in the prompt
            plan.prompt_targets = seq.tokens[start + 1:min(start + n, seq.prompt_len - 1) + 1]
            plan.prompt_top = k
        return plan

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = -(-num_tokens // self.kv.block_size) - len(seq.block_table)
        if need <= 0:
            return True
        blocks = self.kv.allocate(need)
        if blocks is None:
            return False
        seq.block_table.extend(blocks)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.kv.cache_pages(seq.tokens[: seq.num_computed], seq.block_table)
        self.kv.release(seq.block_table)
        seq.block_table, seq.num_computed = [], 0
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------------------------------ results
    def process(self, batch: ScheduledBatch, next_tokens: list[int], logprobs: list[float] | None = None,
                top_logprobs: list[list[tuple[int, float]]] | None = None,
                grammar_done: set[str] | None = None, prompt_logprobs: dict | None = None) -> list[TokenOutput]:
        """Advance every scheduled sequence; ``next_tokens`` has one entry per sampled sequence.
        ``grammar_done``: requests whose structured-output grammar is complete (they stop here).
        ``prompt_logprobs``: index in the batch -> (logprobs, top candidates) of its prompt positions."""
        outputs = self.finished_outputs
        self.finished_outputs = []
        k = 0
        for i, (seq, plan) in enumerate(zip(batch.seqs, batch.plans)):
            if seq.finished:  # aborted while the step ran
                if plan.sample:
                    k += 1  # its row was sampled all the same: keep the rows of the others aligned
                continue
            if prompt_logprobs and i in prompt_logprobs:
                lps, tops = prompt_logprobs[i]
                outputs.append(TokenOutput(seq.rid, [], prompt_start=plan.start + 1, prompt_logprobs=lps,
                                           prompt_top_logprobs=tops))
            seq.num_computed += len(plan.token_ids)
            # Only a step that fills a page has anything new to publish; skipping the others saves slicing
            # every sequence's token list on every decode step (~1 ms of host time at batch 256).
            page = self.kv.block_size
            filled = seq.num_computed // page > (seq.num_computed - len(plan.token_ids)) // page
            if not plan.sample:
                if filled:
                    self.kv.cache_pages(seq.tokens[: seq.num_computed], seq.block_table)
                continue
            token = next_tokens[k]
            out = TokenOutput(seq.rid, [token])
            if logprobs is not None and seq.sampling.logprobs:
                out.logprobs = [logprobs[k]]
            if top_logprobs is not None and seq.sampling.top_logprobs:
                out.top_logprobs = [top_logprobs[k]]
            k += 1
            seq.tokens.append(token)
            if filled:
                self.kv.cache_pages(seq.tokens[: seq.num_computed], seq.block_table)
            if not seq.reported_cached:
                out.cached_tokens, seq.reported_cached = max(seq.cached_tokens, 0), True
            reason = "stop" if grammar_done and seq.rid in grammar_done else self._stop_reason(seq, token)
            if reason is not None:
                out.finished, out.finish_reason = True, reason
                self._finish(seq, reason)
            outputs.append(out)
        return outputs

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        sp = seq.sampling
        if (not sp.ignore_eos and token in self.cfg.eos_token_ids) or token in sp.stop_token_ids:
            return "stop"
        if seq.num_outputs >= sp.max_new_tokens or len(seq.tokens) >= self.cfg.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finished, seq.finish_reason = True, reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        if seq.block_table:
            self.kv.release(seq.block_table)
            seq.block_table = []
        self.by_rid.pop(seq.rid, None)

    def load(self) -> ReplicaLoad:
        seqs = list(self.running) + list(self.waiting)
        return ReplicaLoad(
            running=len(self.running), waiting=len(self.waiting),
            outstanding_tokens=sum(s.outstanding_tokens for s in seqs),
            kv_used=self.kv.usage(), kv_total_tokens=self.kv.num_blocks * self.kv.block_size,
            cached_tokens=self.kv.cached_tokens())
