"""A Serve application from Python: build_openai_app takes a FlotillaServeConfig or a dict of its fields."""

import os

from ray import serve

from flotilla.integrations.ray_serve import build_openai_app

app = build_openai_app({
    "model_source": os.environ.get("MODEL", "/models/qwen3-0.6b"),
    "served_model_name": "my-model",
    "api_key": "sk-local",
    "engine_kwargs": {"max_num_seqs": 32},   # each replica's engine: its own dp/tp inside
    "num_replicas": 1,                       # or "autoscaling_config": {"min_replicas": 1, "max_replicas": 8}
})
serve.run(app, name="flotilla", route_prefix="/")  # waits until the app is running
