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
    # a resumed request's detokenizer state (flotilla/worker/texts.py): its last ``held`` output ids have no text
    # yet; its text so far is ``text_len`` characters ending in ``text_tail`` (enough for a stop string to start in)
    held: int = 0
    text_tail: str = ""
    text_len: int = 0


class AbortRequest(msgspec.Struct, tag=True):
    rid: str
    reason: str = "abort"


class FlushCache(msgspec.Struct, tag=True):
    pass


class Shutdown(msgspec.Struct, tag=True):
    pass


# Control operations (weight updates, pause, memory). Each carries the front end's ``op_id``; the leader answers
# every one with a ``ControlDone`` for that id. The model-touching ones (ModelOp below) travel on to every rank
# inside ``BatchPlan.op`` and are applied by all ranks in one step.

# Where the tensors of a weight update come from (flotilla/weights/): one tagged union, one struct per transport.
class FileSource(msgspec.Struct, tag=True):
    """A safetensors file or checkpoint folder every rank of the replica can read (memory-mapped)."""

    path: str


class StagedSource(msgspec.Struct, tag=True):
    """(name, tensor) pairs a launcher handed to each rank's process beforehand under ``key`` (Ray: fetched
    from the object store by the rank actor)."""

    key: str


class BroadcastSource(msgspec.Struct, tag=True):
    """Full tensors broadcast by rank 0 of the trainer's weight-sync group ``group_name``, in ``names`` order."""

    group_name: str
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[list[int]] = []


class IpcTensor(msgspec.Struct, array_like=True):
    """A CUDA tensor of another process on this node, as the fields of torch's IPC handle (no pickle)."""

    name: str
    dtype: str
    shape: list[int]
    stride: list[int]
    offset: int               # storage offset of the tensor, in elements
    device: int
    handle: bytes             # cudaIpcMemHandle of the storage's allocation
    storage_size: int         # bytes
    storage_offset: int       # bytes of the storage into the allocation
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    device_uuid: str = ""     # the GPU's UUID: a consumer that numbers its GPUs otherwise finds it by this


class IpcSource(msgspec.Struct, tag=True):
    """A colocated trainer's CUDA tensors: ``tensors[r]`` for group rank ``r``, or ``tensors[0]`` for every
    rank when the list has one entry."""

    tensors: list[list[IpcTensor]] = []


WeightSource = FileSource | StagedSource | BroadcastSource | IpcSource


class UpdateWeights(msgspec.Struct, tag=True):
    """Phase one of a weight update: every rank of the replica stages its shard of ``source`` into scratch
    buffers (the live weights untouched) and the group agrees whether all staged; the leader answers. Phase two
    is ``CommitWeights`` (or ``DiscardWeights``) of this ``op_id``, sent once every replica answered."""

    op_id: int
    source: WeightSource
    version: int
    flush_cache: bool = True


class CommitWeights(msgspec.Struct, tag=True):
    """Copy what ``UpdateWeights`` ``stage_id`` staged into the live weights on every rank; then the replica
    serves ``version`` (``flush_cache``: drop all KV computed with the old weights)."""

    op_id: int
    stage_id: int
    version: int
    flush_cache: bool = True


class DiscardWeights(msgspec.Struct, tag=True):
    """Drop what ``UpdateWeights`` ``stage_id`` staged (another replica failed it): the old weights serve on."""

    op_id: int
    stage_id: int


class Pause(msgspec.Struct, tag=True):
    """Stop scheduling (running requests keep their KV and continue after Resume)."""

    op_id: int


class Resume(msgspec.Struct, tag=True):
    op_id: int


class ReleaseMemory(msgspec.Struct, tag=True):
    """Free the KV cache (running requests are preempted, to recompute later) and optionally offload weights."""

    op_id: int
    weights: bool = False


class ResumeMemory(msgspec.Struct, tag=True):
    op_id: int


# Weight-sync groups (RL trainers; flotilla/weights/broadcast.py). Model ops too: every rank joins or leaves in
# the same step; updates through a group are UpdateWeights with a BroadcastSource.
class InitWeightSyncGroup(msgspec.Struct, tag=True):
    """Join the trainer's torch.distributed group: ``ranks[r]`` is the group rank of this replica group's
    rank ``r`` (the trainer is rank 0); the trainer's TCPStore listens at master_address:master_port."""

    op_id: int
    master_address: str
    master_port: int
    world_size: int
    ranks: list[int]
    group_name: str = "weight_update_group"
    backend: str = "gloo"
    timeout_s: float = 600.0
    connect_timeout_s: float = 30.0  # reaching the trainer's store; the rest of the join has timeout_s


class DestroyWeightSyncGroup(msgspec.Struct, tag=True):
    op_id: int
    group_name: str = "weight_update_group"


# LoRA adapters (flotilla/lora/, flotilla/weights/adapters.py): model ops too, staged then committed like weights.
class LoadLora(msgspec.Struct, tag=True):
    """Phase one of loading (or replacing) adapter ``name``: every rank reads the PEFT folder ``path`` and stages
    its shards; the live adapters are untouched. ``lora_id``: never reused, it keys the adapter's prefix-cache
    entries (a replaced adapter gets a new one, so no KV of its old weights is matched). Phase two is
    ``CommitLora`` (or ``DiscardLora``) of this ``op_id``."""

    op_id: int
    name: str
    path: str
    lora_id: int
    version: int = 1


class CommitLora(msgspec.Struct, tag=True):
    """Serve what ``LoadLora`` ``stage_id`` staged as adapter ``name`` (replacing an older one of that name: its
    running requests recompute their KV with the new weights)."""

    op_id: int
    stage_id: int
    name: str
    lora_id: int


class DiscardLora(msgspec.Struct, tag=True):
    op_id: int
    stage_id: int


class UnloadLora(msgspec.Struct, tag=True):
    """Forget adapter ``name`` (the front end first waits until no request of it is in flight)."""

    op_id: int
    name: str


LORA_OPS = (LoadLora, CommitLora, DiscardLora, UnloadLora)

ModelOp = (UpdateWeights | CommitWeights | DiscardWeights | ReleaseMemory | ResumeMemory | InitWeightSyncGroup |
           DestroyWeightSyncGroup | LoadLora | CommitLora | DiscardLora | UnloadLora)
MODEL_OPS = (UpdateWeights, CommitWeights, DiscardWeights, ReleaseMemory, ResumeMemory, InitWeightSyncGroup,
             DestroyWeightSyncGroup, *LORA_OPS)

ToWorker = (AddRequest | AbortRequest | FlushCache | Shutdown | UpdateWeights | CommitWeights | DiscardWeights |
            Pause | Resume | ReleaseMemory | ResumeMemory | InitWeightSyncGroup | DestroyWeightSyncGroup |
            LoadLora | CommitLora | DiscardLora | UnloadLora)


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
    # log-probabilities of prompt tokens prompt_start, prompt_start + 1, ... (from a prefill slice)
    prompt_start: int = 0
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    # detokenized in the leader (flotilla/worker/texts.py; None: the front end detokenizes): the new text, how many
    # of the request's ids have no text yet, and where a stop string found this step ends the request's text
    text: str | None = None
    held: int = 0
    text_end: int | None = None


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
    num_overlapped_steps: int = 0  # steps planned while the step before still ran (overlap scheduling)
    weight_version: int = 0
    # pipeline parallel (pp_size > 1): forwards run by each stage so far, and the most micro-batches that
    # were in flight at once
    stage_forwards: list[int] = []
    max_in_flight: int = 0


class StepOutput(msgspec.Struct, tag=True):
    replica: int
    outputs: list[TokenOutput]
    load: ReplicaLoad


class StepStarted(msgspec.Struct, tag=True):
    """A leader put these requests in a batch for the first time, sent before that step's forward: the front
    end's evidence that a death of this replica may have been caused by one of them (poison accounting)."""

    replica: int
    rids: list[str]


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


class ControlDone(msgspec.Struct, tag=True):
    """A leader's answer to a control operation (``error`` set when any rank of the replica failed it)."""

    replica: int
    op_id: int
    op: str
    weight_version: int
    error: str | None = None


class Heartbeat(msgspec.Struct, tag=True):
    """A leader's sign of life, sent by a thread of its own every ``HEARTBEAT_S`` whatever its step loop does.

    Why a thread: a leader busy in one long step (a long CPU prefill, a first kernel compile, a weight
    load) sends no StepOutput for that long, yet is alive; a stopped or dead process sends nothing at all
    (SIGSTOP stops every thread). ``steps``: forward steps completed so far. ``step_age_s``: how long the
    step loop has been away from its request socket (running a step, or waiting on its group's
    collectives); 0 when idle. A value that keeps growing means a step that does not end (a hung peer
    rank, a deadlock), which the front end may judge by a limit of its own.
    """

    replica: int
    rank: int
    steps: int
    step_age_s: float


FromWorker = StepOutput | StepStarted | WorkerReady | WorkerFailed | ControlDone | Heartbeat


# ----------------------------------------------------------------------------------- rank 0 -> TP peers
class SeqPlan(msgspec.Struct, array_like=True):
    """One sequence's slice of a forward pass: compute tokens [start, start+len(token_ids)) of it."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool
    # prompt logprobs: the prompt tokens that follow the first len(prompt_targets) positions of this slice
    # (their log-probabilities are computed from this forward), and how many top candidates to report
    prompt_targets: list[int] = []
    prompt_top: int = 0
    # overlap scheduling: >= 0 when the slice's one token is not known on the host yet: it is row ``prev_row``
    # of the token ids the previous step sampled (still on the device); ``token_ids`` then holds a placeholder
    prev_row: int = -1
    # LoRA: the device slot of the adapter this sequence runs (``BatchPlan.lora_map``), -1 for the base model
    lora_slot: int = -1


class BatchPlan(msgspec.Struct, tag=True):
    seqs: list[SeqPlan]
    kind: str = "forward"  # "forward" | "idle" | "stop"
    op: ModelOp | None = None  # a control operation the leader holds, applied once every rank has it
    # LoRA: the adapter each device slot must hold for this step ("" = none needed), by slot index; every rank
    # loads a slot that holds another adapter before the forward
    lora_map: list[str] = []


encoder = msgspec.msgpack.Encoder()
to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)
batch_plan_decoder = msgspec.msgpack.Decoder(BatchPlan)
