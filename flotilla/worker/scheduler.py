"""Continuous batching with chunked prefill and preemption by recompute.

Each step packs, within ``max_num_batched_tokens``: one token for every decoding sequence, the next
chunk of every sequence still in prefill, then new sequences from the queue while pages and
``max_num_seqs`` allow. When the pool cannot hold the next token of a running sequence, the most
recently admitted one gives its pages back and returns to the head of the queue to be recomputed
later (its finished pages usually survive in the prefix cache, so the recompute is cheap).

A step's results come back in two parts, so the worker can schedule step N+1 while step N still runs on
the device (overlap scheduling): ``advance`` when the step is launched (its KV counts as computed, each
sampled sequence gets a placeholder token the next step reads from the device), ``record`` once its sampled
ids are on the host (placeholders replaced, stop conditions checked). ``process`` is both at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from flotilla.ipc.messages import ReplicaLoad, SeqPlan, TokenOutput
from flotilla.lora.slots import AdapterSlots
from flotilla.worker.kv_cache import KVBlockManager
from flotilla.worker.sequence import Sequence

# What a sampled sequence's new token reads as between ``advance`` and ``record`` (a valid id: the plan that
# carries it is marked ``prev_row`` and the device overwrites it with the real token)
PLACEHOLDER = 0


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
    def __init__(self, cfg: SchedulerConfig, kv: KVBlockManager, adapters: AdapterSlots | None = None):
        self.cfg = cfg
        self.kv = kv
        self.adapters = adapters  # LoRA: loaded adapters and device slots (None: LoRA off)
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
        lora = getattr(sampling, "lora_name", None)
        if lora is not None:
            if self.adapters is None or lora not in self.adapters.ids:
                self.finished_outputs.append(TokenOutput(
                    rid, [], True, "error", error=f"lora_name: adapter {lora!r} is not loaded on this replica"))
                return
            seq.lora, seq.cache_id = lora, self.adapters.cache_id(lora)
        self._arrivals += 1
        self.by_rid[rid] = seq
        self.waiting.append(seq)

    def abort(self, rid: str, reason: str = "abort") -> None:
        seq = self.by_rid.get(rid)
        if seq is None:
            return
        self._finish(seq, reason)
        self.finished_outputs.append(TokenOutput(rid, [], True, reason, cached_tokens=max(seq.cached_tokens, 0)))

    def end(self, rid: str, reason: str) -> None:
        """End a request the leader finished itself (a stop string, flotilla/worker/texts.py) without an output of
        its own: the step's output already told the front end."""
        seq = self.by_rid.get(rid)
        if seq is not None:
            self._finish(seq, reason)

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

    def replace_adapter(self, name: str, lora_id: int) -> None:
        """Adapter ``name`` now has new weights (prefix-cache space ``lora_id``): its running sequences go back
        to the queue to recompute their KV with them, and every sequence of it caches in the new space."""
        for seq in sorted(self.running, key=lambda s: s.arrival, reverse=True):
            if seq.lora == name and not seq.pending:
                self._preempt(seq)
        for seq in list(self.running) + list(self.waiting):
            if seq.lora != name:
                continue
            if seq in self.waiting and seq.block_table:
                self.kv.release(seq.block_table)
                seq.block_table, seq.num_computed = [], 0
            seq.cache_id = lora_id

    def uses_adapter(self, name: str) -> bool:
        return any(s.lora == name for s in self.by_rid.values())

    # ------------------------------------------------------------------------------------------ schedule
    def schedule(self, exclude: set[str] | None = None, max_seqs: int | None = None) -> ScheduledBatch | None:
        """The next batch. ``exclude``: rids in flight in another (pipeline) micro-batch, neither scheduled nor
        preempted until their results are processed. ``max_seqs``: at most this many sequences in the batch."""
        exclude = exclude or set()
        limit = max_seqs or self.cfg.max_num_seqs
        budget = self.cfg.max_num_batched_tokens
        seqs: list[Sequence] = []
        plans: list[SeqPlan] = []
        # Running sequences first, oldest first, so preemption hits the newest.
        self.running.sort(key=lambda s: s.arrival)
        i = 0
        while i < len(self.running) and budget > 0 and len(seqs) < limit:
            seq = self.running[i]
            if seq.rid in exclude or (seq.pending and self._length_stop(seq, len(seq.tokens))):
                i += 1  # (a sequence whose pending token surely ends it by length gets no slot)
                continue
            n = min(seq.remaining_prefill, budget)
            if not self._grow(seq, seq.num_computed + n):
                # never a sequence in flight elsewhere (a later stage still writes its pages), one whose last
                # token is still on the device, or one in this batch
                victim = next((v for v in reversed(self.running)
                               if v.rid not in exclude and not v.pending and v not in seqs), None)
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
        prefilling = {(s.cache_id, tuple(s.tokens[:page])) for s, p in zip(seqs, plans)
                      if share and p.start < page and len(s.tokens) > page}
        deferred: list[Sequence] = []
        # LoRA: once a request's adapter finds no free slot, no further adapter request is admitted this step
        # (base-model ones still are), so the slots in use drain and the waiting adapter gets one
        slots_full = False
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs and len(seqs) < limit:
            seq = self.waiting[0]
            if prefilling and len(seq.tokens) > page and (seq.cache_id, tuple(seq.tokens[:page])) in prefilling \
                    and seq.sampling.prompt_logprobs is None:
                deferred.append(self.waiting.popleft())
                continue
            if seq.lora is not None and (slots_full or not self.adapters.can_take(seq.lora)):
                slots_full = True
                deferred.append(self.waiting.popleft())
                continue
            if not seq.block_table:
                # prompt logprobs are computed by the forward, so such a prompt is computed whole
                blocks, cached = ([], 0) if seq.sampling.prompt_logprobs is not None else \
                    self.kv.match_prefix(seq.tokens, seq.cache_id)
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
            if seq.lora is not None:
                seq.lora_slot = self.adapters.acquire(seq.lora)
            seqs.append(seq)
            plans.append(self._plan(seq, n))
            budget -= n
            if share and plans[-1].start < page and len(seq.tokens) > page:
                prefilling.add((seq.cache_id, tuple(seq.tokens[:page])))
        self.waiting.extendleft(reversed(deferred))
        if not seqs:
            return None
        return ScheduledBatch(seqs, plans)

    def _plan(self, seq: Sequence, n: int) -> SeqPlan:
        start = seq.num_computed
        plan = SeqPlan(seq.tokens[start:start + n], start, list(seq.block_table), start + n == len(seq.tokens))
        if seq.pending:  # its one token to compute is the previous step's sampled id, still on the device
            plan.prev_row = seq.feed_row
        if seq.lora_slot >= 0:
            plan.lora_slot = seq.lora_slot
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
        assert not seq.pending, "a sequence whose token is still on the device cannot be preempted"
        self.num_preemptions += 1
        self.running.remove(seq)
        self._release_slot(seq)
        self.kv.cache_pages(seq.tokens[: seq.num_computed], seq.block_table, seq.cache_id)
        self.kv.release(seq.block_table)
        seq.block_table, seq.num_computed = [], 0
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------------------------------ results
    def process(self, batch: ScheduledBatch, next_tokens: list[int], logprobs: list[float] | None = None,
                top_logprobs: list[list[tuple[int, float]]] | None = None,
                grammar_done: set[str] | None = None, prompt_logprobs: dict | None = None) -> list[TokenOutput]:
        """``advance`` and ``record`` at once: the step's results are already on the host."""
        self.advance(batch)
        return self.record(batch, next_tokens, logprobs, top_logprobs, grammar_done, prompt_logprobs)

    def advance(self, batch: ScheduledBatch) -> None:
        """The step is launched: its tokens' KV counts as computed (pages it fills are published: they hold
        known tokens only, and any step that reads them runs after this one on the device), and each sampled
        sequence gets a placeholder for its new token, row ``feed_row`` of the step's sampled ids."""
        page = self.kv.block_size
        k = 0
        for seq, plan in zip(batch.seqs, batch.plans):
            row = k
            k += plan.sample  # an aborted sequence's row is sampled all the same: rows stay aligned
            if seq.finished:
                continue
            n = len(plan.token_ids)
            seq.num_computed += n
            # Only a step that fills a page has anything new to publish; skipping the others saves slicing
            # every sequence's token list on every decode step (~1 ms of host time at batch 256). A page is
            # published once its tokens are known: one holding a placeholder waits for ``record``.
            known = min(seq.num_computed, len(seq.tokens) - seq.pending)
            if known // page > (seq.num_computed - n) // page:
                self.kv.cache_pages(seq.tokens[:known], seq.block_table, seq.cache_id)
            if plan.sample:
                seq.tokens.append(PLACEHOLDER)
                seq.pending += 1
                seq.feed_row = row

    def record(self, batch: ScheduledBatch, next_tokens: list[int], logprobs: list[float] | None = None,
               top_logprobs: list[list[tuple[int, float]]] | None = None,
               grammar_done: set[str] | None = None, prompt_logprobs: dict | None = None) -> list[TokenOutput]:
        """The step's sampled ids reached the host (``next_tokens``: one per sampled sequence): put each in
        place of its placeholder, stop the sequences that are done, and return the outputs to report.
        ``grammar_done``: requests whose structured-output grammar is complete (they stop here).
        ``prompt_logprobs``: index in the batch -> (logprobs, top candidates) of its prompt positions."""
        outputs = self.finished_outputs
        self.finished_outputs = []
        k = 0
        for i, (seq, plan) in enumerate(zip(batch.seqs, batch.plans)):
            if seq.finished:  # aborted while the step ran, or stopped by the step before (overlap)
                k += plan.sample
                continue
            if prompt_logprobs and i in prompt_logprobs:
                lps, tops = prompt_logprobs[i]
                outputs.append(TokenOutput(seq.rid, [], prompt_start=plan.start + 1, prompt_logprobs=lps,
                                           prompt_top_logprobs=tops))
            if not plan.sample:
                continue
            token = next_tokens[k]
            out = TokenOutput(seq.rid, [token])
            if logprobs is not None and seq.sampling.logprobs:
                out.logprobs = [logprobs[k]]
            if top_logprobs is not None and seq.sampling.top_logprobs:
                out.top_logprobs = [top_logprobs[k]]
            k += 1
            at = len(seq.tokens) - seq.pending  # the oldest placeholder is this step's
            seq.tokens[at] = token
            seq.pending -= 1
            if (at + 1) % self.kv.block_size == 0 and at < seq.num_computed:  # a computed page is known now
                self.kv.cache_pages(seq.tokens[: at + 1], seq.block_table, seq.cache_id)
            if not seq.reported_cached:
                out.cached_tokens, seq.reported_cached = max(seq.cached_tokens, 0), True
            reason = "stop" if grammar_done and seq.rid in grammar_done else self._stop_reason(seq, token, at + 1)
            if reason is not None:
                out.finished, out.finish_reason = True, reason
                self._finish(seq, reason)
            outputs.append(out)
        return outputs

    def _stop_reason(self, seq: Sequence, token: int, length: int) -> str | None:
        """Why ``seq`` stops at ``token``, its ``length``-th token (placeholders after it not counted)."""
        sp = seq.sampling
        if (not sp.ignore_eos and token in self.cfg.eos_token_ids) or token in sp.stop_token_ids:
            return "stop"
        return "length" if self._length_stop(seq, length) else None

    def _length_stop(self, seq: Sequence, length: int) -> bool:
        """A sequence of ``length`` tokens has reached its output or context limit."""
        return length - seq.prompt_len >= seq.sampling.max_new_tokens or length >= self.cfg.max_model_len

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finished, seq.finish_reason = True, reason
        if seq in self.running:
            self.running.remove(seq)
            self._release_slot(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        if seq.block_table:
            self.kv.release(seq.block_table)
            seq.block_table = []
        self.by_rid.pop(seq.rid, None)

    def _release_slot(self, seq: Sequence) -> None:
        if seq.lora_slot >= 0:
            self.adapters.release(seq.lora_slot)
            seq.lora_slot = -1

    def lora_map(self, batch: ScheduledBatch) -> list[str]:
        """The adapter each slot must hold for ``batch`` ([] when it runs the base model only)."""
        if self.adapters is None or all(p.lora_slot < 0 for p in batch.plans):
            return []
        return self.adapters.slot_map()

    def load(self) -> ReplicaLoad:
        seqs = list(self.running) + list(self.waiting)
        return ReplicaLoad(
            running=len(self.running), waiting=len(self.waiting),
            outstanding_tokens=sum(s.outstanding_tokens for s in seqs),
            kv_used=self.kv.usage(), kv_total_tokens=self.kv.num_blocks * self.kv.block_size,
            cached_tokens=self.kv.cached_tokens())
