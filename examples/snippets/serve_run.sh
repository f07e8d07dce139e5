# MODEL: a checkpoint folder every node can read. Values are strings; each is read as its field's type
# (ints, true/false, JSON for dicts), and a bad value or unknown key fails naming the field.
serve run flotilla.integrations.ray_serve:build_openai_app \
    model_source="$MODEL" served_model_name=my-model api_key=sk-local num_replicas=1 \
    engine_kwargs='{"max_num_seqs": 32}' prefix_affinity=false
