# from the repository root; Ray Data's progress bar streams with the job's logs, tokens/s comes last
ray job submit --working-dir . -- python examples/batch_ray_data.py \
    --model /models/qwen3-0.6b --input examples/snippets/prompts.jsonl --output /tmp/answers
