"""Batched token sampling: penalties, greedy, temperature, top-k / top-p / min-p and seeded draws.

Design goals, and why:

* **No per-request host sync.** Everything a step needs from the Python ``SamplingParams`` is packed on the host
  into one tensor and copied to the device once (``SamplingBatch.build``); ``Sampler.forward`` then only
  launches kernels. The caller reads the results back once at the end.
* **The common case costs nothing extra.** Which stages run (penalties, the sort for filtering, seeded draws,
  log-probs) is decided from Python flags computed at build time, so a batch of plain greedy requests is one
  ``argmax`` and a batch with no top-k/top-p/min-p never sorts.
* **Greedy matches transformers token for token.** Greedy rows take ``torch.argmax`` of the (penalised) float32
  logits, which is what ``generate`` does, ties included (the first maximal index).
* **Seeded requests are reproducible whatever they are batched with.** Sampling uses the exponential race
  ``argmax(p / q)``, ``q ~ Exp(1)`` i.i.d. per vocabulary entry, which draws exactly from ``p``. A seeded row's
  ``q`` comes from a generator seeded only from ``(seed, number of tokens already generated)``, and every other
  step on the row (penalties, filtering cut-off, the race) is computed from that row alone, so the chosen token
  does not depend on the other rows, their order, or which optional stages the batch happened to run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from flotilla.sampling import SamplingParams

__all__ = ["Sampler", "SamplerOutput", "SamplingBatch", "mix_seed"]

# Below this temperature, logits / T can overflow float32 (and the distribution is one-hot to float precision
# anyway), so sampled rows divide by at least this much. temperature == 0 is greedy and never divides.
MIN_TEMPERATURE = 1e-5

_MASK64 = (1 << 64) - 1
_N_SCALARS = 8  # per-row columns of the packed parameter block, see SamplingBatch.build


def _splitmix64(x: int) -> int:
    """One round of splitmix64: a cheap, well-mixed 64-bit hash so nearby (seed, step) pairs give unrelated seeds."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, step: int) -> int:
    """The generator seed for a seeded request's draw at output position ``step``.

    Depends only on the pair, so a request reproduces its tokens no matter how it is batched, and hashing (rather
    than ``seed + step``) keeps request A's step 1 from reusing request B's step 0 when ``B.seed == A.seed + 1``.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))


@dataclass
class SamplerOutput:
    """What one sampling step produced, still on the logits' device (the caller copies it back once)."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32: log_softmax(raw logits) at the chosen token
    top_ids: torch.Tensor | None = None  # [B, K] int64, K = max top_logprobs in the batch
    top_logprobs: torch.Tensor | None = None  # [B, K] float32, sorted descending per row


@dataclass
class SamplingBatch:
    """Per-step device tensors for a batch, built once from the requests' Python parameters.

    Optional tensors are ``None`` when no row needs them; the ``use_*`` / ``any_*`` flags are plain Python bools
    so the sampler can skip whole stages without reading anything back from the device.
    """

    size: int
    vocab_size: int
    device: torch.device
    greedy: torch.Tensor | None  # [B] bool; None when nothing but a plain argmax is needed
    temperature: torch.Tensor | None  # [B] float32, 1.0 on greedy rows (never divides by 0); None as above
    all_greedy: bool
    any_greedy: bool
    # filtering (None unless some sampled row uses it); disabled rows hold neutral values (k=V, p=1, min_p=0)
    top_k: torch.Tensor | None = None  # [B] int64 in [1, V]
    top_p: torch.Tensor | None = None  # [B] float32
    min_p: torch.Tensor | None = None  # [B] float32
    max_top_k: int = 0  # largest top_k over sampled rows (V when some sampled row has top-k off)
    use_top_k: bool = False
    use_top_p: bool = False
    use_min_p: bool = False
    # penalties (None unless some row uses them)
    repetition_penalty: torch.Tensor | None = None  # [B] float32
    seen_mask: torch.Tensor | None = None  # [B, V] bool: token occurs in prompt + output
    presence_penalty: torch.Tensor | None = None  # [B] float32
    frequency_penalty: torch.Tensor | None = None  # [B] float32
    output_counts: torch.Tensor | None = None  # [B, V] float32: occurrences in the output so far
    # random draws
    seeded_rows: list[tuple[int, int]] = field(default_factory=list)  # (row, mixed generator seed), sampled rows
    any_unseeded: bool = False  # some sampled row draws from the default generator
    # log-probs
    need_logprobs: bool = False
    max_top_logprobs: int = 0

    @property
    def use_filter(self) -> bool:
        return self.use_top_k or self.use_top_p or self.use_min_p

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]],
              vocab_size: int, device: torch.device | str) -> "SamplingBatch":
        """Pack the batch's parameters (and, only if penalties are used, its token ids) into one host tensor,
        copy it to ``device`` in one transfer, and unpack views / small derived tensors there.

        Token ids outside ``[0, vocab_size)`` are ignored for penalties (filtered on the host, so no device sync).
        A batch of plain greedy rows (no penalties) copies nothing at all.
        """
        B, V = len(params), int(vocab_size)
        if len(prompt_ids) != B or len(output_ids) != B:
            raise ValueError(f"SamplingBatch.build: {B} params but {len(prompt_ids)} prompts and "
                             f"{len(output_ids)} outputs")
        if V <= 0:
            raise ValueError(f"SamplingBatch.build: vocab_size must be positive, got {V}")
        dev = torch.device(device)

        scalars: list[float] = []
        rep_rows: list[int] = []
        rep_seqs: list[list[int]] = []  # prompt and output of each rep row, one after the other
        out_rows: list[int] = []
        out_seqs: list[list[int]] = []
        seeded: list[tuple[int, int]] = []
        any_greedy = any_unseeded = use_k = use_p = use_m = False
        max_k = 0
        max_top = 0
        need_lp = False
        for r, p in enumerate(params):
            greedy = p.temperature == 0.0
            any_greedy |= greedy
            k, top_p, min_p = V, 1.0, 0.0
            if not greedy:
                if 0 < p.top_k < V:
                    k, use_k = p.top_k, True
                if p.top_p < 1.0:
                    top_p, use_p = float(p.top_p), True
                if p.min_p > 0.0:
                    min_p, use_m = float(p.min_p), True
                max_k = max(max_k, k)
                if p.seed is not None:
                    seeded.append((r, mix_seed(p.seed, len(output_ids[r]))))
                else:
                    any_unseeded = True
            temp = 1.0 if greedy else max(float(p.temperature), MIN_TEMPERATURE)
            scalars += [temp, float(greedy), float(k), top_p, min_p, float(p.repetition_penalty),
                        float(p.presence_penalty), float(p.frequency_penalty)]
            if p.repetition_penalty != 1.0:
                rep_rows += [r, r]
                rep_seqs += [prompt_ids[r], output_ids[r]]
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                out_rows.append(r)
                out_seqs.append(output_ids[r])
            if p.logprobs or p.top_logprobs > 0:
                need_lp = True
                max_top = max(max_top, p.top_logprobs)

        all_greedy = B > 0 and not (any_unseeded or seeded)
        batch = cls(size=B, vocab_size=V, device=dev, greedy=None, temperature=None,
                    all_greedy=all_greedy, any_greedy=any_greedy,
                    max_top_k=max_k, use_top_k=use_k, use_top_p=use_p, use_min_p=use_m,
                    seeded_rows=seeded, any_unseeded=any_unseeded,
                    need_logprobs=need_lp, max_top_logprobs=max_top)
        if all_greedy and not rep_rows and not out_rows:
            return batch  # a plain argmax needs nothing on the device

        # One int64 block: [B x 8 float64 scalars, bit-cast | rep flat ids | out flat ids], where a flat id is
        # row * V + token. One block means one host->device copy; numpy because converting long Python lists
        # with it is several times faster than with torch.tensor.
        rep_flat = _flat_ids(rep_rows, rep_seqs, V)
        out_flat = _flat_ids(out_rows, out_seqs, V)
        n_sc, n_rep, n_out = B * _N_SCALARS, rep_flat.size, out_flat.size
        pin = dev.type == "cuda" and torch.cuda.is_available()
        host = torch.empty(n_sc + n_rep + n_out, dtype=torch.int64, pin_memory=pin)
        h = host.numpy()
        h[:n_sc] = np.asarray(scalars, dtype=np.float64).view(np.int64)
        h[n_sc: n_sc + n_rep] = rep_flat
        h[n_sc + n_rep:] = out_flat
        block = host.to(dev, non_blocking=pin)

        sc = block[:n_sc].view(torch.float64).view(B, _N_SCALARS)
        batch.greedy = sc[:, 1] > 0.5
        batch.temperature = sc[:, 0].float()
        if use_k or use_p or use_m:
            batch.top_k = sc[:, 2].long()
            batch.top_p = sc[:, 3].float()
            batch.min_p = sc[:, 4].float()
        if rep_rows:
            batch.repetition_penalty = sc[:, 5].float()
            seen = torch.zeros(B * V, dtype=torch.bool, device=dev)
            # index_fill_ takes the value as a scalar argument (no host tensor to copy); duplicate ids write the
            # same value, so the result is deterministic
            seen.index_fill_(0, block[n_sc: n_sc + n_rep], True)
            batch.seen_mask = seen.view(B, V)
        if out_rows:
            batch.presence_penalty = sc[:, 6].float()
            batch.frequency_penalty = sc[:, 7].float()
            counts = torch.zeros(B * V, dtype=torch.float32, device=dev)
            # scatter_add (atomics) rather than index_put_(accumulate=True), whose CUDA path sorts and can sync;
            # adding 1.0s is exact in float32 (integers < 2**24), so the atomics' order does not matter
            counts.scatter_add_(0, block[n_sc + n_rep:], torch.ones(n_out, dtype=torch.float32, device=dev))
            batch.output_counts = counts.view(B, V)
        return batch


def _flat_ids(rows: list[int], seqs: list[list[int]], vocab_size: int) -> np.ndarray:
    """``row * vocab_size + token`` for every token of ``seqs[i]`` (belonging to ``rows[i]``), int64.

    Ids outside ``[0, vocab_size)`` are dropped here on the host, so the device never needs a bounds check.
    """
    if not rows:
        return np.empty(0, dtype=np.int64)
    arrays = [np.asarray(seq, dtype=np.int64) for seq in seqs]
    ids = np.concatenate(arrays)
    row_idx = np.repeat(np.asarray(rows, dtype=np.int64), [a.size for a in arrays])
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        ok = (ids >= 0) & (ids < vocab_size)
        ids, row_idx = ids[ok], row_idx[ok]
    return row_idx * vocab_size + ids


class Sampler(torch.nn.Module):
    """Turns a step's last-position logits into one token per row (see the module docstring for the design)."""

    def __init__(self) -> None:
        super().__init__()
        # one reusable generator per device for seeded rows: it is re-seeded before every use, and on CUDA each
        # kernel captures the generator's state at launch, so reuse within a step is safe
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        return g

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample one token per row of ``logits`` [B, V] (any float dtype; all math in float32)."""
        if logits.dim() != 2 or logits.shape[0] != batch.size:
            raise ValueError(f"Sampler: expected logits [{batch.size}, V], got {tuple(logits.shape)}")
        raw = logits.float()  # may alias ``logits``: everything below is out of place
        x = self._penalise(raw, batch)

        greedy_ids = x.argmax(dim=-1) if batch.any_greedy else None
        if batch.all_greedy or batch.size == 0:
            token_ids = greedy_ids if greedy_ids is not None else torch.empty(0, dtype=torch.long,
                                                                              device=logits.device)
        else:
            s = x / batch.temperature[:, None]
            if batch.use_filter:
                s = self._filter(s, batch)
            q = self._exponentials(s, batch)
            # argmax(p / q) == argmax(log p - log q) == argmax(s - log q): softmax's normaliser is per-row and
            # cancels, so no softmax is needed and filtered (-inf) tokens can never win.
            sampled = (s - q.log()).argmax(dim=-1)
            token_ids = sampled if greedy_ids is None else torch.where(batch.greedy, greedy_ids, sampled)

        out = SamplerOutput(token_ids=token_ids)
        if batch.need_logprobs:
            lp = torch.log_softmax(raw, dim=-1)
            out.logprobs = lp.gather(1, token_ids[:, None]).squeeze(1)
            if batch.max_top_logprobs > 0:
                k = min(batch.max_top_logprobs, lp.shape[-1])
                vals, idx = lp.topk(k, dim=-1, largest=True, sorted=True)
                out.top_ids, out.top_logprobs = idx, vals
        return out

    @staticmethod
    def _penalise(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Repetition (HF-style, prompt + output), then presence/frequency (OpenAI-style, output only).

        Rows that do not use a penalty get neutral factors (1 and 0), which leave their logits bit-identical.
        """
        if batch.seen_mask is None and batch.output_counts is None:
            return x
        V = x.shape[-1]
        if batch.seen_mask is not None:
            seen = _fit_vocab(batch.seen_mask, V)
            pen = batch.repetition_penalty[:, None]
            x = torch.where(seen, torch.where(x < 0, x * pen, x / pen), x)
        if batch.output_counts is not None:
            counts = _fit_vocab(batch.output_counts, V)
            x = x - (batch.presence_penalty[:, None] * (counts > 0) + batch.frequency_penalty[:, None] * counts)
        return x

    @staticmethod
    def _filter(s: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Mask everything below each row's cut-off logit with -inf (top-k, then top-p, then min-p).

        Each filter keeps a prefix of the row sorted in descending order, so together they keep the shortest of
        those prefixes; we find its length per row, read the logit at that rank as the row's cut-off, and mask
        ``s < cutoff`` in vocabulary order (ties with the cut-off are kept, as transformers' top-k does). The
        cut-off depends only on the row, so a row filters the same whether or not the batch needed a full sort.
        """
        V = s.shape[-1]
        if not (batch.use_top_p or batch.use_min_p) and batch.max_top_k < V:
            # top-k only: a partial top-k of the largest k in the batch is enough and cheaper than a full sort
            vals = s.topk(batch.max_top_k, dim=-1, sorted=True).values
            n_keep = batch.top_k.clamp(max=batch.max_top_k)
        else:
            vals = s.sort(dim=-1, descending=True).values
            n_keep = batch.top_k.clamp(max=V)
            probs = vals.softmax(dim=-1)
            if batch.use_top_p:
                # renormalise over the top-k survivors (as chaining HF's warpers does) by scaling the threshold
                rank = torch.arange(V, device=s.device)
                pk = probs.masked_fill(rank[None, :] >= n_keep[:, None], 0.0)
                before = pk.cumsum(dim=-1) - pk  # mass strictly above each rank
                top_p = batch.top_p[:, None]
                keep = (before < top_p * pk.sum(dim=-1, keepdim=True)) | (top_p >= 1.0)
                n_keep = torch.minimum(n_keep, keep.sum(dim=-1))
            if batch.use_min_p:
                # relative to the top probability; the ratio is unchanged by renormalising after top-k/top-p
                keep = probs >= batch.min_p[:, None] * probs[:, :1]
                n_keep = torch.minimum(n_keep, keep.sum(dim=-1))
        n_keep = n_keep.clamp(min=1)  # the top token always survives, even if NaNs upset the counts
        cutoff = vals.gather(1, (n_keep - 1)[:, None])
        return s.masked_fill(s < cutoff, float("-inf"))

    def _exponentials(self, s: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """q ~ Exp(1) per entry: one shared draw for unseeded rows, a private re-seeded draw per seeded row."""
        if batch.any_unseeded:
            q = torch.empty_like(s).exponential_()
        else:
            q = torch.ones_like(s)  # greedy rows only besides the seeded ones: their q is never used
        if batch.seeded_rows:
            g = self._generator(s.device)
            for row, seed in batch.seeded_rows:
                g.manual_seed(seed)
                # q[row] is a contiguous [V] view, and exponential_ numbers its draws by position within the
                # tensor it fills, so the values do not depend on the row's place in the batch (tested)
                q[row].exponential_(generator=g)
        # Exp(1) can round to exactly 0, which would make log(q) = -inf and pick the token regardless of p
        return q.clamp_min_(torch.finfo(q.dtype).tiny)


def _fit_vocab(t: torch.Tensor, V: int) -> torch.Tensor:
    """Match a [B, vocab_size] penalty tensor to the logits' width (padded vocabularies get no penalty)."""
    if t.shape[-1] == V:
        return t
    if t.shape[-1] > V:
        return t[:, :V]
    return torch.cat([t, t.new_zeros(t.shape[0], V - t.shape[-1])], dim=-1)
