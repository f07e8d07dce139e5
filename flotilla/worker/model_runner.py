"""Builds the model on its device, owns the KV pool tensors, and turns a batch plan into logits."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from flotilla.config import EngineConfig
from flotilla.distributed.dp_attention import dp_attention_mlp
from flotilla.ipc.messages import SeqPlan
from flotilla.model.attention import AttentionMetadata, make_backend
from flotilla.model.loader import init_dummy, load_checkpoint
from flotilla.model.models import model_class
from flotilla.worker.cuda_graph import CudaGraphRunner
from flotilla.worker.feed import feed_input_ids

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
CPU_DEFAULT_KV_TOKENS = 16384


@dataclass
class ForwardInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_index: torch.Tensor   # rows of the hidden states whose logits are wanted


class ModelRunner:
    def __init__(self, cfg: EngineConfig, device: torch.device):
        from transformers import AutoConfig

        self.cfg = cfg
        self.device = device
        self.dtype = _DTYPES[cfg.dtype]
        self.kv_dtype = _KV_DTYPES.get(cfg.kv_cache_dtype, self.dtype)  # "auto": the model's dtype
        self.hf_config = AutoConfig.from_pretrained(cfg.model)
        self.block_size = cfg.block_size
        cls = model_class(cfg.hf_config)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(device):
                self.model = cls(self.hf_config, max_positions=cfg.max_model_len, **self._stage_kwargs(cfg))
        finally:
            torch.set_default_dtype(prev)
        if cfg.load_format == "dummy":
            init_dummy(self.model, cfg.seed)
        else:
            load_checkpoint(self.model, cfg.model)
        self.model.eval()
        self.lora = None  # LoRA adapters: slots on every targeted layer (allocated before the KV cache is sized)
        if cfg.enable_lora:
            from flotilla.lora.store import LoraStore

            self.lora = LoraStore(self.model, cfg.max_loras, cfg.max_lora_rank, self.dtype, device)
        self.vocab_size = self.hf_config.vocab_size
        self.backend = make_backend(cfg.attention_backend, device)
        self.num_blocks = 0  # set by allocate_kv once the TP group agreed on a size
        self.graphs: CudaGraphRunner | None = None  # decode CUDA graphs (CUDA, single rank, Triton backend)
        self.prompt_logprobs: dict = {}  # filled by a forward whose plans ask for prompt logprobs

    # ------------------------------------------------------------------------------------------ pipeline
    def _stage_kwargs(self, cfg: EngineConfig) -> dict:
        """With pp_size > 1: this rank's pipeline stage (its layer range), for the model's constructor."""
        self.pp_stage = None
        if cfg.pp_size == 1:
            return {}
        from flotilla.distributed import get_group
        from flotilla.distributed.pipeline import stage_info

        self.pp_stage = stage_info(get_group("pp").rank, self.hf_config.num_hidden_layers, cfg.pp_size,
                                   cfg.pp_layer_partition)
        return {"pp_stage": self.pp_stage}

    def _dummy_hidden(self, n: int) -> torch.Tensor | None:
        if self.pp_stage is None or self.pp_stage.is_first:
            return None
        return torch.zeros((n, self.hf_config.hidden_size), dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward_stage(self, plans: list[SeqPlan], hidden_in: torch.Tensor | None,
                      lora_map: list[str] | None = None) -> torch.Tensor:
        """One pipeline stage's forward: the hidden states to pass on (a stage other than the last), or the
        float32 logits of the sampled rows (the last). ``hidden_in``: the previous stage's (None on the first)."""
        if self.lora is not None:
            self.lora.bind(lora_map or [])
        inp = self.prepare(plans)
        hidden = self.model(inp.input_ids, inp.positions, inp.meta, hidden_in=hidden_in)
        if not self.pp_stage.is_last:
            return hidden
        return self.model.compute_logits(hidden[inp.sample_index]).float()

    # ------------------------------------------------------------------------------------------ memory
    def _kv_bytes_per_block(self) -> int:
        layers = self.model.attention_layers()
        a = layers[0]
        return 2 * len(layers) * self.block_size * a.num_kv_heads * a.head_dim * torch.finfo(self.kv_dtype).bits // 8

    def plan_kv_blocks(self) -> int:
        """Pages this rank could hold; the worker takes the minimum over its TP group."""
        if self.cfg.kv_cache_tokens is not None:
            return max(1, self.cfg.kv_cache_tokens // self.block_size)
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_TOKENS // self.block_size
        peak = self._profile_peak_activation()
        free, total = torch.cuda.mem_get_info(self.device)
        # This process's share (gpu_memory_utilization of the card, less what it already holds), never more
        # than is free: several ranks may share one GPU, each with its own fraction.
        share = total * self.cfg.gpu_memory_utilization - torch.cuda.memory_reserved(self.device)
        budget = min(share, free) - peak
        blocks = int(budget // self._kv_bytes_per_block())
        if blocks < 1:
            raise RuntimeError("gpu_memory_utilization: no GPU memory left for the KV cache "
                               f"(free {free / 2**30:.1f} GiB, "
                               f"activation peak {peak / 2**30:.1f} GiB)")
        return blocks

    def _profile_peak_activation(self) -> int:
        """Run the largest prefill batch once against a one-page cache to learn the activation peak."""
        self._allocate_kv(1)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        n = min(self.cfg.max_num_batched_tokens, self.cfg.max_model_len)
        plan = SeqPlan([0] * n, 0, [0] * (-(-n // self.block_size)), True)
        if self.pp_stage is not None:
            self.forward_stage([plan], self._dummy_hidden(n))
        else:
            self.forward([plan])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        self._free_kv()
        return int(peak * 1.1)

    def allocate_kv(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._allocate_kv(num_blocks)
        if self._graphs_supported():
            max_bs = min(self.cfg.cuda_graph_max_bs, self.cfg.max_num_seqs)
            max_context = min(self.cfg.max_model_len, num_blocks * self.block_size)
            from flotilla.distributed import get_group

            self.graphs = CudaGraphRunner(self, max_bs, max_context, dp_size=get_group("attn_dp").size)
            self.graphs.capture()

    def _graphs_supported(self) -> bool:
        """Decode graphs need CUDA, a graph-safe attention backend, one rank (no collectives inside the
        graph), and for MoE models the Triton fused MoE (the torch reference syncs with the host)."""
        from flotilla.distributed import get_group
        from flotilla.model.layers.moe import FusedMoE

        if not (self.cfg.enable_cuda_graph and self.device.type == "cuda"):
            return False
        if not getattr(self.backend, "graph_safe", False):
            log.info("CUDA graphs off: attention backend %r cannot be captured", self.backend.name)
            return False
        dp_graphs = get_group("attn_dp").size > 1 and os.environ.get("FLOTILLA_DP_ATTENTION_GRAPHS") == "1"
        if self.lora is not None and not self.lora.batch.use_triton:
            log.info("CUDA graphs off: the torch LoRA reference cannot be captured")
            return False
        if get_group("pp").size > 1 or (not dp_graphs and (get_group("tp").size > 1 or get_group("attn_tp").size > 1
                                                          or get_group("attn_dp").size > 1)):
            log.info("CUDA graphs off: only single-rank replicas (and, with FLOTILLA_DP_ATTENTION_GRAPHS=1, "
                     "DP-attention layouts) capture decode graphs")
            return False
        probe = torch.empty(0, device=self.device)
        if any(isinstance(m, FusedMoE) and not m.uses_triton(probe) for m in self.model.modules()):
            log.info("CUDA graphs off: the torch MoE reference runs decode eagerly")
            return False
        return True

    def _allocate_kv(self, num_blocks: int) -> None:
        for attn in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            attn.backend = self.backend

    def _free_kv(self) -> None:
        # Graphs hold the KV tensors' addresses (and a memory pool): they die with the cache and are
        # captured again by the next allocate_kv. Anything that moves the weights must do the same.
        self.graphs = None
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------ memory
    @property
    def weights_offloaded(self) -> bool:
        """Whether ``release_memory(weights=True)`` moved the weights to host memory (updates wait for
        ``resume_memory``). Weight updates themselves are ``flotilla.weights.rank``'s."""
        return bool(getattr(self, "_offloaded", None))

    def release_memory(self, weights: bool = False) -> None:
        """Free the KV cache (and its CUDA graphs); with ``weights``, move the parameters to host memory."""
        self._free_kv()
        if weights and not getattr(self, "_offloaded", None):
            pin = self.device.type == "cuda"
            self._offloaded = {}
            for name, p in self.model.named_parameters():
                host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
                host.copy_(p.data)
                self._offloaded[name] = host
                p.data = torch.empty(0, dtype=p.dtype, device=self.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        """Undo release_memory: weights back on the device, a zeroed KV cache of the same size (graphs are
        captured again, since the buffers moved)."""
        offloaded = getattr(self, "_offloaded", None)
        if offloaded:
            for name, p in self.model.named_parameters():
                if name in offloaded:
                    p.data = offloaded[name].to(self.device)
            self._offloaded = {}
        if self.model.attention_layers()[0].k_cache is None:
            self.allocate_kv(self.num_blocks)

    # ------------------------------------------------------------------------------------------ forward
    def prepare(self, plans: list[SeqPlan]) -> ForwardInputs:
        bs = self.block_size
        q_lens = [len(p.token_ids) for p in plans]
        ctx = [p.start + n for p, n in zip(plans, q_lens)]
        total = sum(q_lens)
        ids = np.fromiter((t for p in plans for t in p.token_ids), dtype=np.int64, count=total)
        pos = np.concatenate([np.arange(p.start, c, dtype=np.int64) for p, c in zip(plans, ctx)]) if plans else \
            np.zeros(0, np.int64)
        max_blocks = max((len(p.block_table) for p in plans), default=1) or 1
        tables = np.zeros((len(plans), max_blocks), dtype=np.int32)
        for i, p in enumerate(plans):
            tables[i, : len(p.block_table)] = p.block_table
        seq_idx = np.repeat(np.arange(len(plans)), q_lens)
        slots = tables[seq_idx, pos // bs].astype(np.int64) * bs + pos % bs
        cu_q = np.zeros(len(plans) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu_q[1:])
        sample_rows = [int(cu_q[i + 1]) - 1 for i, p in enumerate(plans) if p.sample]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev, non_blocking=True),
            cu_q=torch.from_numpy(cu_q).to(dev, non_blocking=True),
            context_lens=torch.tensor(ctx, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(tables).to(dev, non_blocking=True),
            q_lens_cpu=q_lens, context_lens_cpu=ctx, block_size=bs,
            max_q_len=max(q_lens, default=0), max_context_len=max(ctx, default=0),
            is_decode=bool(plans) and all(n == 1 for n in q_lens))
        plan = getattr(self.backend, "plan", None)
        if plan is not None:
            plan(meta)  # per-forward work a backend would otherwise redo in every layer
        if self.lora is not None:
            self.lora.set_rows(plans, q_lens)
        return ForwardInputs(torch.from_numpy(ids).to(dev, non_blocking=True),
                             torch.from_numpy(pos).to(dev, non_blocking=True), meta,
                             torch.tensor(sample_rows, dtype=torch.long).to(dev, non_blocking=True))

    def _dp_replay_size(self, plans: list[SeqPlan], dp_counts: list[int]) -> int | None:
        """With DP-attention graphs: agree with the other groups on a graph size (one all-gather of a flag
        over the attention-DP group per step; the ranks of one attention-TP group share their plans)."""
        from flotilla.distributed import get_group
        from flotilla.worker.cuda_graph import dp_replay_size

        flags = [bool(f) for (f,) in get_group("attn_dp").all_gather_ints([int(self.graphs.can_run_local(plans))])]
        return dp_replay_size(self.graphs.sizes, dp_counts, flags)

    @torch.inference_mode()
    def forward(self, plans: list[SeqPlan], dp_counts: list[int] | None = None,
                fed: torch.Tensor | None = None, lora_map: list[str] | None = None) -> torch.Tensor:
        """Logits [num sampled sequences, vocab] in float32 (every rank of the attention group gets them).

        ``dp_counts``: with DP attention, the token count of every attention-DP group in this step.
        ``fed``: the token ids the previous step sampled, on this device (overlap scheduling): a plan with
        ``prev_row`` >= 0 computes ``fed[prev_row]`` in place of its placeholder.
        ``lora_map``: the adapter each LoRA slot must hold for this step (``BatchPlan.lora_map``).
        A decode batch that fits a captured CUDA graph replays it; the logits are then a view of the graph's
        output buffer, valid until the next forward.
        """
        if self.lora is not None:
            self.lora.bind(lora_map or [])
        if self.graphs is not None and dp_counts is None and self.graphs.can_run(plans):
            return self.graphs.run(plans, fed=fed)
        if self.graphs is not None and dp_counts is not None and self.graphs.dp_size > 1:
            bs = self._dp_replay_size(plans, dp_counts)
            if bs is not None:
                return self.graphs.run(plans, bs=bs, fed=fed)
        inp = self.prepare(plans)
        if fed is not None:
            feed_input_ids(inp.input_ids, plans, fed, inp.meta.q_lens_cpu)
        if dp_counts is None:
            hidden = self.model(inp.input_ids, inp.positions, inp.meta)
        else:
            hidden = self.model(inp.input_ids, inp.positions, inp.meta, mlp_fn=dp_attention_mlp(dp_counts))
        if any(p.prompt_targets for p in plans):
            self.prompt_logprobs = self._prompt_logprobs(plans, hidden, inp.meta.cu_q)
        return self.model.compute_logits(hidden[inp.sample_index]).float()

    def take_prompt_logprobs(self) -> dict[int, tuple[list[float], list[list[tuple[int, float]]] | None]]:
        """What the last forward computed for plans with ``prompt_targets``: plan index -> (logprob of each
        target, its top candidates or None)."""
        out, self.prompt_logprobs = self.prompt_logprobs, {}
        return out

    def _prompt_logprobs(self, plans: list[SeqPlan], hidden: torch.Tensor, cu_q: torch.Tensor,
                         rows_per_chunk: int = 512) -> dict:
        """log_softmax (float32) of the logits at prompt positions, gathered at the next prompt token; in
        chunks of rows, so a long prompt never materialises [prompt, vocab] logits at once."""
        starts = cu_q.tolist()
        out = {}
        for i, p in enumerate(plans):
            if not p.prompt_targets:
                continue
            first = starts[i]
            lps: list[float] = []
            tops: list[list[tuple[int, float]]] | None = [] if p.prompt_top else None
            for a in range(0, len(p.prompt_targets), rows_per_chunk):
                b = min(a + rows_per_chunk, len(p.prompt_targets))
                logp = self.model.compute_logits(hidden[first + a:first + b]).float().log_softmax(-1)
                target = torch.tensor(p.prompt_targets[a:b], device=logp.device).unsqueeze(1)
                lps.extend(logp.gather(1, target).squeeze(1).tolist())
                if tops is not None:
                    val, idx = logp.topk(p.prompt_top, dim=-1)
                    tops.extend([list(zip(ir, vr)) for ir, vr in zip(idx.tolist(), val.tolist())])
            out[i] = (lps, tops)
        return out
