"""Per-step cost of structured-output token masks at batch 256: llguidance (the engine's choice) vs xgrammar.

Both libraries fill the mask on the host (the device only applies it), so this runs on a CPU. Models' real
tokenizers cannot be downloaded here, so a byte-level BPE of ``--vocab`` tokens is trained on the Python
sources of the standard library (code and English prose, a realistic mix of token strings). Each step fills
the masks of ``--batch`` requests constrained by one JSON schema and feeds each a token its mask allows.

    python scripts/grammar_mask_bench.py --vocab 32000 --batch 256 --steps 40 [--json out.json]

xgrammar is optional (``pip install --target DIR xgrammar`` and PYTHONPATH=DIR); without it only llguidance runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import sysconfig
import time

import torch

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}},
                                           "address": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "zip": {"type": "string"}},
                                               "required": ["city"]}},
          "required": ["name", "age", "tags"]}


def train_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = [str(p) for p in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))][:400]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def allowed_token(mask_row: torch.Tensor, vocab: int, rng: random.Random) -> int:
    bits = ((mask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().view(-1)[:vocab]
    ids = bits.nonzero().view(-1).tolist()
    return rng.choice(ids)


def bench_llguidance(hf, vocab: int, batch: int, steps: int, rng: random.Random) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    from flotilla.structured import JSON_OPTIONS

    t0 = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS)
    matchers = [llguidance.LLMatcher(tok, grammar) for _ in range(batch)]
    setup = time.perf_counter() - t0
    ex = llguidance.LLExecutor()
    mask = llt.allocate_token_bitmask(batch, vocab)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        llt.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(matchers)], mask)
        times.append(time.perf_counter() - t)
        for i, m in enumerate(matchers):
            if not m.is_stopped():
                m.consume_token(allowed_token(mask[i], vocab, rng))
    return {"setup_s": setup, "fill_ms_p50": 1e3 * statistics.median(times), "fill_ms_max": 1e3 * max(times)}


def bench_xgrammar(hf, vocab: int, batch: int, steps: int, rng: random.Random) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    setup = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(batch, vocab)
    filler = xgr.BatchGrammarMatcher() if hasattr(xgr, "BatchGrammarMatcher") else None
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        if filler is not None:
            filler.batch_fill_next_token_bitmask(matchers, mask)
        else:
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(mask, i)
        times.append(time.perf_counter() - t)
        for i, m in enumerate(matchers):
            if not m.is_terminated():
                m.accept_token(allowed_token(mask[i], vocab, rng))
    return {"setup_s": setup, "fill_ms_p50": 1e3 * statistics.median(times), "fill_ms_max": 1e3 * max(times),
            "batched_fill": filler is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    hf = train_tokenizer(args.vocab)
    vocab = len(hf)
    out = {"vocab": vocab, "batch": args.batch, "steps": args.steps, "threads": torch.get_num_threads()}
    out["llguidance"] = bench_llguidance(hf, vocab, args.batch, args.steps, random.Random(0))
    try:
        out["xgrammar"] = bench_xgrammar(hf, vocab, args.batch, args.steps, random.Random(0))
    except ImportError as e:
        out["xgrammar"] = f"not installed ({e})"
    print(json.dumps(out, indent=1))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
