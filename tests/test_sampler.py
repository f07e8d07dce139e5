"""Sampler semantics: exact greedy, filters, seeded reproducibility, distribution, penalties and log-probs.

Every test runs on CPU; where CUDA is available the device-parametrised ones also run there.
"""

from __future__ import annotations

import math

import pytest
import torch

from flotilla.sampling import SamplingParams
from flotilla.worker.sampler import Sampler, SamplingBatch, mix_seed

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def run(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]] | None = None,
        outputs: list[list[int]] | None = None, sampler: Sampler | None = None):
    B, V = logits.shape
    prompts = prompts if prompts is not None else [[] for _ in range(B)]
    outputs = outputs if outputs is not None else [[] for _ in range(B)]
    batch = SamplingBatch.build(params, prompts, outputs, V, logits.device)
    return (sampler or Sampler())(logits, batch)


def test_greedy_equals_argmax_including_ties(device):
    g = torch.Generator().manual_seed(0)
    B, V = 16, 1000
    logits = torch.randn(B, V, generator=g)
    # ties at the maximum: transformers' argmax returns the first index, so must we
    logits[3, [7, 500, 999]] = 50.0
    logits[5, :] = 1.0  # all equal -> index 0
    logits[9, [998, 999]] = 40.0
    logits = logits.to(device)
    out = run(logits, [SamplingParams(temperature=0.0) for _ in range(B)])
    assert torch.equal(out.token_ids.cpu(), torch.argmax(logits, dim=-1).cpu())
    assert out.token_ids[3].item() == 7 and out.token_ids[5].item() == 0 and out.token_ids[9].item() == 998
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


def test_greedy_bf16_and_mixed_batch(device):
    """Greedy rows stay exact argmax when batched with sampled/seeded/filtered rows, for low-precision logits."""
    g = torch.Generator().manual_seed(1)
    B, V = 12, 257
    logits = torch.randn(B, V, generator=g).to(torch.bfloat16)
    logits[0, [10, 20]] = 8.0
    logits = logits.to(device)
    params = [SamplingParams(temperature=0.0) if i % 2 == 0 else
              SamplingParams(temperature=0.7, top_p=0.8, top_k=5, seed=i if i % 4 == 1 else None)
              for i in range(B)]
    out = run(logits, params)
    expect = torch.argmax(logits.float(), dim=-1)
    assert torch.equal(out.token_ids[0::2].cpu(), expect[0::2].cpu())
    assert out.token_ids[0].item() == 10


@pytest.mark.parametrize("kind", ["top_k", "top_p", "min_p"])
def test_degenerate_filters_equal_greedy(device, kind):
    g = torch.Generator().manual_seed(2)
    B, V = 32, 300
    logits = (torch.randn(B, V, generator=g) * 3).to(device)
    opts = {"top_k": {"top_k": 1}, "top_p": {"top_p": 1e-6}, "min_p": {"min_p": 1.0}}[kind]
    torch.manual_seed(0)
    for temp in (0.5, 1.0, 3.0):
        for _ in range(5):
            out = run(logits, [SamplingParams(temperature=temp, **opts) for _ in range(B)])
            assert torch.equal(out.token_ids, torch.argmax(logits, dim=-1))


def _decode(sampler: Sampler, params: list[SamplingParams], row_logits: list[torch.Tensor], row: int,
            steps: int, V: int, device: torch.device, gen: torch.Generator) -> list[int]:
    """Run ``steps`` sampling steps, feeding each row its own tokens back; row ``row`` gets fixed logits
    (``row_logits[step]``), the others fresh random ones. Returns row ``row``'s tokens."""
    B = len(params)
    outputs: list[list[int]] = [[] for _ in range(B)]
    prompts = [[1, 2, 3] for _ in range(B)]
    for step in range(steps):
        logits = torch.randn(B, V, generator=gen)
        logits[row] = row_logits[step]
        batch = SamplingBatch.build(params, prompts, outputs, V, device)
        toks = sampler(logits.to(device), batch).token_ids.tolist()
        for r in range(B):
            outputs[r].append(toks[r])
    return outputs[row]


@pytest.mark.parametrize("filters", [{}, {"top_k": 40}, {"top_p": 0.9}, {"top_k": 40, "min_p": 0.01}])
def test_seeded_row_independent_of_batch(device, filters):
    V, steps = 500, 12
    g = torch.Generator().manual_seed(3)
    row_logits = [torch.randn(V, generator=g) * 2 for _ in range(steps)]
    mine = SamplingParams(temperature=0.9, seed=1234, repetition_penalty=1.1, **filters)
    alone = _decode(Sampler(), [mine], row_logits, 0, steps, V, device, torch.Generator().manual_seed(10))
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_k=3),
              SamplingParams(temperature=0.5, seed=7, top_p=0.5), SamplingParams(min_p=0.2, presence_penalty=1.0),
              SamplingParams(temperature=1.0)]
    for pos in (2, 5):
        params = others[:pos] + [mine] + others[pos:]
        torch.manual_seed(pos)  # unseeded rows' draws must not matter either
        mixed = _decode(Sampler(), params, row_logits, pos, steps, V, device, torch.Generator().manual_seed(20 + pos))
        assert mixed == alone, (pos, filters)
    # a fresh sampler (fresh generator objects) reproduces it too
    again = _decode(Sampler(), [mine], row_logits, 0, steps, V, device, torch.Generator().manual_seed(99))
    assert again == alone
    assert len(set(alone)) > 1  # it really sampled


def test_different_seeds_differ(device):
    V, B, steps = 1000, 8, 10
    logits = torch.zeros(B, V, device=device)  # uniform: each draw is one of 1000 tokens
    outputs: list[list[int]] = [[] for _ in range(B)]
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(B)]
    sampler = Sampler()
    for _ in range(steps):
        toks = run(logits, params, outputs=outputs, sampler=sampler).token_ids.tolist()
        for r in range(B):
            outputs[r].append(toks[r])
    seqs = {tuple(o) for o in outputs}
    assert len(seqs) == B
    # within a sequence the draw changes with the step, too
    assert all(len(set(o)) > steps // 2 for o in outputs)
    # same seed, same step -> same token; the mixed seed depends on both parts
    toks_a = run(logits[:2], [SamplingParams(seed=5)] * 2, outputs=[[0, 0], [1, 1]]).token_ids.tolist()
    assert toks_a[0] == toks_a[1]
    assert mix_seed(1, 0) != mix_seed(0, 1) and mix_seed(5, 3) == mix_seed(5, 3)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    expected = probs.double() * n
    return float(((counts.double() - expected) ** 2 / expected).sum())


# chi-square critical values at p = 1e-4 for dof 2 and 4, so a correct sampler fails about once per 10^4 runs
# (and these runs use a fixed seed, so never)
_CHI2_CRIT = {2: 18.42, 4: 23.51}


def test_unseeded_distribution_matches_softmax(device):
    torch.manual_seed(1234)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(1234)
    base = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    N = 40000
    logits = base.expand(N, -1).contiguous().to(device)
    toks = run(logits, [SamplingParams(temperature=1.0)] * N).token_ids.cpu()
    counts = torch.bincount(toks, minlength=5)
    assert _chi_square(counts, torch.softmax(base, -1)) < _CHI2_CRIT[4]

    # temperature + top-k renormalises over the survivors
    toks = run(logits, [SamplingParams(temperature=0.5, top_k=3)] * N).token_ids.cpu()
    counts = torch.bincount(toks, minlength=5)
    keep = torch.tensor([0, 3, 4])
    assert counts[[1, 2]].sum() == 0
    assert _chi_square(counts[keep], torch.softmax(base[keep] / 0.5, -1)) < _CHI2_CRIT[2]

    # top-p keeps the smallest prefix reaching p: probs ~ [.31 .11 .07 .46 .06] -> {3, 0} reach 0.77 < 0.8,
    # so {3, 0, 4} (0.83) survive
    toks = run(logits, [SamplingParams(temperature=1.0, top_p=0.8)] * N).token_ids.cpu()
    counts = torch.bincount(toks, minlength=5)
    assert counts[[1, 2]].sum() == 0
    assert _chi_square(counts[keep], torch.softmax(base[keep], -1)) < _CHI2_CRIT[2]


def test_seeded_distribution_matches_softmax():
    """Seeded draws are still draws from the softmax (over many seeds)."""
    base = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    N = 6000
    logits = base.expand(N, -1).contiguous()
    toks = run(logits, [SamplingParams(seed=s) for s in range(N)]).token_ids
    counts = torch.bincount(toks, minlength=5)
    assert _chi_square(counts, torch.softmax(base, -1)) < _CHI2_CRIT[4]


def test_min_p_filters_relative_to_max():
    base = torch.log(torch.tensor([0.5, 0.3, 0.12, 0.08]))
    logits = base.expand(4000, -1).contiguous()
    torch.manual_seed(0)
    toks = run(logits, [SamplingParams(min_p=0.5)] * 4000).token_ids  # keep p >= 0.25: tokens 0, 1
    assert set(toks.tolist()) == {0, 1}


def test_penalties_exact_values():
    V = 6
    raw = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0]] * 4)
    prompts = [[0, 1], [0, 1], [0, 1], [0, 1]]
    outputs = [[1, 2, 2], [1, 2, 2], [1, 2, 2], [1, 2, 2]]
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0),
              SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(temperature=0.0)]
    batch = SamplingBatch.build(params, prompts, outputs, V, "cpu")
    pen = Sampler._penalise(raw, batch)
    # repetition over prompt+output {0, 1, 2}: positive / 2, negative * 2; others untouched
    assert pen[0].tolist() == [1.0, -2.0, 0.25, -3.0, 1.0, 0.0]
    # presence/frequency over output only (token 0 is prompt-only): counts {1: 1, 2: 2}
    assert pen[1].tolist() == [2.0, -1.0 - 0.75, 0.5 - 1.0, -3.0, 1.0, 0.0]
    # both: repetition first, then presence/frequency
    assert pen[2].tolist() == [1.0, -2.75, -0.75, -3.0, 1.0, 0.0]
    # a row with no penalties is bit-identical
    assert torch.equal(pen[3], raw[3])
    # and greedy picks from the penalised logits: row 0 now ties 0 and 4 at 1.0 -> first index
    out = Sampler()(raw, batch)
    assert out.token_ids.tolist() == [0, 0, 0, 0]
    raw2 = torch.tensor([[2.0, 1.9, 0.0, 0.0, 0.0, 0.0]])
    b2 = SamplingBatch.build([SamplingParams(temperature=0.0, frequency_penalty=0.1)], [[]], [[0, 0]], V, "cpu")
    assert Sampler()(raw2, b2).token_ids.tolist() == [1]  # 2.0 - 0.2 = 1.8 < 1.9


def test_penalty_free_batch_builds_nothing():
    batch = SamplingBatch.build([SamplingParams(temperature=0.0), SamplingParams()], [[1, 2], [3]], [[4], []],
                                10, "cpu")
    assert batch.seen_mask is None and batch.output_counts is None
    assert not batch.use_filter and batch.top_k is None
    assert batch.any_greedy and not batch.all_greedy and batch.any_unseeded
    plain = SamplingBatch.build([SamplingParams(temperature=0.0)] * 3, [[1]] * 3, [[2]] * 3, 10, "cpu")
    assert plain.all_greedy and plain.greedy is None and plain.temperature is None  # nothing copied at all


def test_out_of_vocab_ids_ignored_and_length_mismatch():
    batch = SamplingBatch.build([SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0)], [[0, 99]],
                                [[-1, 3, 1000]], 5, "cpu")
    assert batch.seen_mask[0].tolist() == [True, False, False, True, False]
    assert batch.output_counts[0].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        SamplingBatch.build([SamplingParams()], [[], []], [[]], 5, "cpu")


def test_logprobs_at_chosen_token(device):
    g = torch.Generator().manual_seed(5)
    B, V = 6, 50
    logits = (torch.randn(B, V, generator=g) * 2).to(device)
    params = [SamplingParams(temperature=0.0, logprobs=True),
              SamplingParams(temperature=0.7, logprobs=True, repetition_penalty=1.5),  # raw, not penalised
              SamplingParams(temperature=1.2, top_k=5),
              SamplingParams(temperature=0.0, presence_penalty=2.0, logprobs=True),
              SamplingParams(seed=3, logprobs=True),
              SamplingParams(temperature=0.0)]
    out = run(logits, params, prompts=[[0, 1, 2]] * B, outputs=[[3, 4]] * B)
    lp = torch.log_softmax(logits.float(), dim=-1)
    expect = lp.gather(1, out.token_ids[:, None]).squeeze(1)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (B,)
    torch.testing.assert_close(out.logprobs, expect, rtol=0, atol=0)
    assert out.top_ids is None and out.top_logprobs is None


def test_top_logprobs_sorted_and_correct(device):
    g = torch.Generator().manual_seed(6)
    B, V = 4, 40
    logits = torch.randn(B, V, generator=g).to(torch.float16).to(device)
    params = [SamplingParams(top_logprobs=3), SamplingParams(temperature=0.0, top_logprobs=5),
              SamplingParams(temperature=0.0), SamplingParams(logprobs=True)]
    out = run(logits, params)
    K = 5
    assert out.top_ids.shape == (B, K) and out.top_logprobs.shape == (B, K)
    assert out.top_ids.dtype == torch.int64 and out.top_logprobs.dtype == torch.float32
    lp = torch.log_softmax(logits.float(), dim=-1)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    torch.testing.assert_close(out.top_logprobs, lp.sort(dim=-1, descending=True).values[:, :K], rtol=0, atol=0)
    torch.testing.assert_close(out.top_logprobs, lp.gather(1, out.top_ids), rtol=0, atol=0)
    assert out.logprobs is not None  # top_logprobs implies logprobs


def test_empty_batch():
    out = run(torch.zeros(0, 8), [])
    assert out.token_ids.shape == (0,)


def test_vocab_width_mismatch_is_tolerated():
    """Logits wider than the tokenizer's vocabulary (padded heads): penalties apply to the real ids only."""
    logits = torch.tensor([[1.0, 2.0, 0.0, 3.0, 5.0, -1.0]])
    batch = SamplingBatch.build([SamplingParams(temperature=0.0, repetition_penalty=10.0)], [[4]], [[]], 5, "cpu")
    assert Sampler()(logits, batch).token_ids.tolist() == [3]


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty", "top_p"])
def test_params_reject_non_finite(field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: float("inf")})


def test_tiny_temperature_is_finite():
    logits = torch.tensor([[100.0, 99.0, -100.0]])
    out = run(logits, [SamplingParams(temperature=1e-30, top_p=0.5)])
    assert out.token_ids.tolist() == [0]
    assert not math.isnan(float(out.token_ids[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_host_sync():
    """Building the batch and sampling must not synchronise with the GPU (only the caller's final read does)."""
    V, B = 4096, 8
    logits = torch.randn(B, V, device="cuda")
    params = [SamplingParams(temperature=0.0, logprobs=True), SamplingParams(top_p=0.9, seed=1),
              SamplingParams(top_k=20, min_p=0.05), SamplingParams(repetition_penalty=1.3, presence_penalty=0.5,
                                                                   frequency_penalty=0.5, top_logprobs=4),
              SamplingParams(seed=2), SamplingParams(temperature=0.3, top_k=5), SamplingParams(),
              SamplingParams(temperature=0.0, repetition_penalty=1.2)]
    prompts, outputs = [[1, 2, 3]] * B, [[4, 5, 5]] * B
    sampler = Sampler()
    sampler(logits, SamplingBatch.build(params, prompts, outputs, V, "cuda"))  # warm-up (lazy CUDA init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = SamplingBatch.build(params, prompts, outputs, V, "cuda")
        out = sampler(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.token_ids.device.type == "cuda" and out.token_ids.shape == (B,)
