"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): dp=2 spread over both gives Engine's tokens,
over CURVE-authenticated tcp sockets bound to the front end's node address."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny  # noqa: E402
from flotilla import SamplingParams  # noqa: E402


def test_dp2_across_two_nodes():
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group, remove_placement_group

    from flotilla.frontend.ray_engine import RayEngine

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    cluster.add_node(num_cpus=1, resources={"node_c": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        path = tiny("llama")
        pg = placement_group([{"CPU": 1, "node_b": 0.1}, {"CPU": 1, "node_c": 0.1}], strategy="STRICT_SPREAD")
        ray.get(pg.ready(), timeout=60)
        sp = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
        with RayEngine(model=path, dp_size=2, placement_group=pg, device="cpu", dtype="float32") as engine:
            assert engine._launcher.multi_node
            assert engine._hub.keys is not None  # tcp + CURVE
            nodes = {n for g in engine._launcher._groups.values() for n in g["node_ids"]}
            assert len(nodes) == 2
            outs = engine.generate(PROMPTS, sp, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == [hf_greedy(path, hf_tokenize(path, p), 12) for p in PROMPTS]
        remove_placement_group(pg)
    finally:
        ray.shutdown()
        cluster.shutdown()
