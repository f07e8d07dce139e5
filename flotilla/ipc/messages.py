"""Every message that crosses a process boundary, as msgspec structs (msgpack on the wire, never pickle).

Front end -> replica rank 0: ``ToWorker``.  Replica rank 0 -> front end: ``FromWorker``.
Rank 0 -> its TP peers (over torch.distributed, as msgpack bytes): ``BatchPlan``.
"""

from __future__ import annotations

import msgspec

from flotilla.sampling import SamplingParams


# ----------------------------------------------------------------------------------- front end -> worker
class AddRequest(msgspec.Struct, tag=True):
    """A request for one replica. ``output_ids`` is non-empty when a request resumes elsewhere after a
    failure: the worker treats prompt + output as the prefix and counts output against max_new_tokens."""

    rid: str
    prompt_ids: list[int]
    sampling: SamplingParams
    output_ids: list[int] = []


class AbortRequest(msgspec.Struct, tag=True):
    rid: str
    reason: str = "abort"


class FlushCache(msgspec.Struct, tag=True):
    pass


class Shutdown(msgspec.Struct, tag=True):
    pass


ToWorker = AddRequest | AbortRequest | FlushCache | Shutdown


# ----------------------------------------------------------------------------------- worker -> front end
class TokenOutput(msgspec.Struct):
    """New tokens of one request from one engine step."""

    rid: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    cached_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None


class ReplicaLoad(msgspec.Struct):
    """What the DPController routes on; piggybacked on every step so no polling is needed."""

    running: int = 0
    waiting: int = 0
    outstanding_tokens: int = 0
    kv_used: float = 0.0
    kv_total_tokens: int = 0
    cached_tokens: int = 0
    num_steps: int = 0
    num_preemptions: int = 0


class StepOutput(msgspec.Struct, tag=True):
    replica: int
    outputs: list[TokenOutput]
    load: ReplicaLoad


class WorkerReady(msgspec.Struct, tag=True):
    replica: int
    rank: int
    pid: int
    num_kv_blocks: int
    block_size: int
    max_model_len: int


class WorkerFailed(msgspec.Struct, tag=True):
    replica: int
    rank: int
    message: str


FromWorker = StepOutput | WorkerReady | WorkerFailed


# ----------------------------------------------------------------------------------- rank 0 -> TP peers
class SeqPlan(msgspec.Struct, array_like=True):
    """One sequence's slice of a forward pass: compute tokens [start, start+len(token_ids)) of it."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool


class BatchPlan(msgspec.Struct, tag=True):
    seqs: list[SeqPlan]
    kind: str = "forward"  # "forward" | "idle" | "stop"


encoder = msgspec.msgpack.Encoder()
to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)
batch_plan_decoder = msgspec.msgpack.Decoder(BatchPlan)
