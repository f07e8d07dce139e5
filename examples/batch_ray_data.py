"""Batch inference as a Ray job: a JSONL file of prompts in, a folder of JSONL results out.

    ray job submit --working-dir . -- python examples/batch_ray_data.py \
        --model /models/qwen3-0.6b --input prompts.jsonl --output /tmp/answers

Each input line is a JSON object with a ``prompt``; every other field (an ``id``, metadata) is carried to the
output as is. Ray Data shows its own progress bar while the rows stream through; the job prints the output
tokens/s at the end. Run it with plain ``python`` to use (or start) a local Ray instance instead.
"""

from __future__ import annotations

import argparse
import json
import time

import ray

from flotilla.integrations.ray_data import FlotillaProcessorConfig, build_processor

DROP = ("sampling_params", "generated_token_ids")  # what the results need not keep


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint folder every node can read")
    p.add_argument("--input", required=True, help="JSONL file (or folder) of {'prompt': ...} rows")
    p.add_argument("--output", required=True, help="folder the JSONL results are written to")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=1, help="engines (Ray Data actors)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--engine-kwargs", type=json.loads, default={}, help='EngineConfig options as JSON')
    args = p.parse_args(argv)

    ray.init()  # under `ray job submit`: the job's cluster
    ray.data.DataContext.get_current().enable_progress_bars = True  # Ray Data's own bar, in the job's logs
    config = FlotillaProcessorConfig(model_source=args.model, engine_kwargs=args.engine_kwargs,
                                     concurrency=args.concurrency, batch_size=args.batch_size)
    sampling = {"max_tokens": args.max_tokens, "temperature": 0.0}
    processor = build_processor(
        config,
        preprocess=lambda row: {"sampling_params": sampling},  # the row's own "prompt" is the input
        # every input column (id, metadata...) is still in the row here, beside the generated ones
        postprocess=lambda row: {k: v for k, v in row.items() if k not in DROP},
    )
    start = time.perf_counter()
    processor(ray.data.read_json(args.input)).write_json(args.output)
    elapsed = time.perf_counter() - start
    written = ray.data.read_json(args.output)
    rows, tokens = written.count(), written.sum("num_generated_tokens")
    print(f"{rows} rows, {tokens} output tokens in {elapsed:.1f}s: {tokens / elapsed:.1f} tokens/s")


if __name__ == "__main__":
    main()
