"""Ray Data batch inference: every input column (an id, nested metadata) reaches postprocess."""

import os

import ray

from flotilla.integrations.ray_data import FlotillaProcessorConfig, build_processor

config = FlotillaProcessorConfig(
    model_source=os.environ.get("MODEL", "/models/qwen3-0.6b"),  # a checkpoint folder every node can read
    engine_kwargs={"max_num_seqs": 64},           # EngineConfig options, checked here, in the driver
    concurrency=1,                                # engines; (1, 4) for an autoscaling pool
    batch_size=16,                                # rows per map_batches call
    max_concurrent_batches=2,                     # batches one engine works on at once
)
processor = build_processor(
    config,
    # returns only what the engine needs; "id" and "meta" stay in the row anyway
    preprocess=lambda row: {"prompt": f"Q: {row['question']}\nA:",
                            "sampling_params": {"max_tokens": 16, "temperature": 0.0}},
    postprocess=lambda row: {"id": row["id"], "meta": row["meta"], "answer": row["generated_text"]},
)
ds = ray.data.from_items([{"id": i, "question": f"what is {i} squared?", "meta": {"source": "demo", "tags": [str(i)]}}
                          for i in range(8)])
rows = processor(ds).take_all()                   # or write_json(...), iter_rows(), show()
for row in sorted(rows, key=lambda r: r["id"])[:3]:
    print(row)
