"""RL weight sync (issue 20): a trainer process broadcasts new weights over gloo to every rank of a dp=2
engine; greedy output then equals transformers on the new weights. Failures leave the old weights live."""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading

import pytest
import torch

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla import Engine, SamplingParams

N = 10
GREEDY = SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)
OPTS = dict(device="cpu", dtype="float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(path: str) -> dict[str, torch.Tensor]:
    from test_weight_update import weights as load

    return load(path)


def tokens(engine) -> list[list[int]]:
    return [o["token_ids"] for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def ckpt():
    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    exp = {p: [hf_greedy(p, hf_tokenize(p, x), N) for x in PROMPTS] for p in (a, b)}
    assert exp[a] != exp[b]
    return a, b, exp


# ---------------------------------------------------------------------------------------------- the trainer
def _trainer(port: int, world_size: int, commands, results, helper: bool, delay_s: float = 0.0) -> None:
    """A standalone trainer: rank 0 of the weight-sync group; broadcasts what it is told to."""
    import time

    import torch.distributed as dist

    time.sleep(delay_s)
    from safetensors.torch import load_file

    from flotilla.rl import TrainerGroup

    group = None
    if helper:  # a trainer with a default group of its own (here a gloo world of one)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
        group = TrainerGroup("127.0.0.1", port, world_size, backend="gloo", timeout=60)
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world_size, rank=0)
    results.put("joined")
    while True:
        cmd = commands.get()
        if cmd is None:
            break
        path, stop_after = cmd
        items = list(load_file(path).items())
        for i, (_, t) in enumerate(items):
            if stop_after is not None and i == stop_after:
                results.put("dying")
                results.close()
                results.join_thread()  # flushed before the process vanishes
                import os

                os._exit(3)  # a trainer that dies half-way through a broadcast
            if group is not None:
                group.broadcast(t)
            else:
                dist.broadcast(t.contiguous(), src=0)
        results.put("sent")
    if group is not None:
        group.close()


class Trainer:
    def __init__(self, world_size: int, helper: bool = False, delay_s: float = 0.0):
        ctx = mp.get_context("spawn")
        self.port = free_port()
        self.commands, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_trainer, daemon=True,
                                args=(self.port, world_size, self.commands, self.results, helper, delay_s))
        self.proc.start()

    def broadcast(self, path: str, stop_after: int | None = None) -> None:
        self.commands.put((path, stop_after))

    def close(self) -> None:
        if self.proc.is_alive():
            self.commands.put(None)
            self.proc.join(20)
        if self.proc.is_alive():
            self.proc.kill()


def one_file(path: str, tmp_path, name: str = "update.safetensors") -> tuple[str, tuple]:
    """The checkpoint as one file, and the (names, dtypes, shapes) of its tensors in file order."""
    from safetensors.torch import load_file, save_file

    from flotilla.rl import weights_meta

    out = str(tmp_path / name)
    save_file(weights(path), out)
    return out, weights_meta(list(load_file(out).items()))


@pytest.fixture(scope="module")
def dp_engine(ckpt):
    with Engine(model=ckpt[0], dp_size=2, **OPTS) as engine:
        yield engine


def test_layout_numbers_ranks_in_stats_order(dp_engine):
    ranks = dp_engine.weight_sync_ranks(rank_offset=5)
    ids = [r["id"] for r in dp_engine.stats()["replicas"]]
    assert [r["rank"] for r in ranks] == [5, 6]
    assert [r["replica"] for r in ranks] == ids and all(r["rank_in_group"] == 0 for r in ranks)


def test_broadcast_update_matches_transformers(dp_engine, ckpt, tmp_path):
    a, b, exp = ckpt
    assert tokens(dp_engine) == exp[a]
    file_b, (names, dtypes, shapes) = one_file(b, tmp_path)
    trainer = Trainer(world_size=3)
    try:
        dp_engine.init_weights_update_group("127.0.0.1", trainer.port, 1, 3, backend="gloo", timeout=60)
        assert trainer.results.get(timeout=30) == "joined"
        v0 = dp_engine.get_weight_version()
        trainer.broadcast(file_b)
        assert dp_engine.update_weights_from_distributed(names, dtypes, shapes, timeout=60) == v0 + 1
        assert trainer.results.get(timeout=30) == "sent"
        assert tokens(dp_engine) == exp[b]
        stats = dp_engine.stats()
        assert stats["weight_version"] == v0 + 1 and [r["weight_version"] for r in stats["replicas"]] == [v0 + 1] * 2

        # refused before any rank is told: the group stays usable, the weights and the version stay
        dp_engine.check_weights_update(names, dtypes, shapes)  # what a trainer asks before it broadcasts
        with pytest.raises(ValueError, match="nope"):
            dp_engine.check_weights_update(names + ["model.nope.weight"], dtypes + ["float32"], shapes + [[4]])
        with pytest.raises(ValueError, match="group_name"):
            dp_engine.check_weights_update(names, dtypes, shapes, group_name="other")
        with pytest.raises(ValueError, match="nope"):
            dp_engine.update_weights_from_distributed(names + ["model.nope.weight"], dtypes + ["float32"],
                                                      shapes + [[4]])
        q = names.index("model.layers.0.self_attn.q_proj.weight")
        bad = [list(s) for s in shapes]
        bad[q] = [bad[q][0] // 2, bad[q][1]]
        with pytest.raises(ValueError, match="q_proj"):
            dp_engine.update_weights_from_distributed(names, dtypes, bad)
        with pytest.raises(ValueError, match="names, dtypes, shapes"):
            dp_engine.update_weights_from_distributed(names, dtypes[:-1], shapes)
        with pytest.raises(ValueError, match="dtypes"):
            dp_engine.update_weights_from_distributed(names, ["int64"] * len(names), shapes)
        with pytest.raises(ValueError, match="group_name"):
            dp_engine.update_weights_from_distributed(names, dtypes, shapes, group_name="other")
        with pytest.raises(ValueError, match="already exists"):
            dp_engine.init_weights_update_group("127.0.0.1", trainer.port, 1, 3, backend="gloo")
        assert dp_engine.get_weight_version() == v0 + 1

        # the same group again, back to a
        file_a, meta_a = one_file(a, tmp_path, "a.safetensors")
        trainer.broadcast(file_a)
        assert dp_engine.update_weights_from_distributed(*meta_a, flush_cache=True, timeout=60) == v0 + 2
        assert trainer.results.get(timeout=30) == "sent"
        assert tokens(dp_engine) == exp[a]

        # the trainer dies half-way: the update fails, saying why, and a keeps serving
        trainer.broadcast(file_b, stop_after=len(names) // 2)
        with pytest.raises(RuntimeError, match="update_weights failed"):
            dp_engine.update_weights_from_distributed(names, dtypes, shapes, timeout=60)
        assert trainer.results.get(timeout=30) == "dying"
        assert dp_engine.get_weight_version() == v0 + 2
        assert tokens(dp_engine) == exp[a]
        assert not dp_engine.stats()["paused"]
    finally:
        trainer.close()
    dp_engine.destroy_weights_update_group()
    with pytest.raises(ValueError, match="does not exist"):
        dp_engine.destroy_weights_update_group()
    with pytest.raises(ValueError, match="init_weights_update_group"):
        dp_engine.update_weights_from_distributed(names, dtypes, shapes)


def test_join_fails_cleanly_when_no_trainer_listens(dp_engine):
    with pytest.raises(RuntimeError, match="joining weight-sync group|did not accept a connection"):
        dp_engine.init_weights_update_group("127.0.0.1", free_port(), 1, 3, group_name="lonely", backend="gloo",
                                            timeout=3)
    assert "lonely" not in dp_engine.control.weights.groups.groups
    assert tokens(dp_engine)  # the replicas still serve


@pytest.mark.parametrize("bad, match", [
    (dict(master_address=""), "master_address"), (dict(master_port=0), "master_port"),
    (dict(rank_offset=0), "rank_offset"), (dict(world_size=2), "world_size"),
    (dict(backend="mpi"), "backend"), (dict(backend="nccl"), "backend"), (dict(group_name=""), "group_name"),
    (dict(timeout=0), "timeout")])
def test_init_arguments_are_checked(dp_engine, bad, match):
    args = dict(master_address="127.0.0.1", master_port=29500, rank_offset=1, world_size=3, backend="gloo")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        dp_engine.init_weights_update_group(**args)


@pytest.mark.parametrize("layout", [dict(tp_size=2, dp_size=2, enable_dp_attention=True), dict(pp_size=2)],
                         ids=["tp2_dp_attention", "pp2"])
def test_trainer_group_helper_with_sharded_layouts(ckpt, tmp_path, layout):
    """A trainer with a default group of its own (flotilla.rl.TrainerGroup). tp=2 with two attention-DP
    replicas: both ranks receive every full tensor and keep their shard. pp=2: each stage keeps its layers
    (the pipeline drains before the op)."""
    a, b, exp = ckpt
    file_b, meta_b = one_file(b, tmp_path)
    with Engine(model=a, **layout, **OPTS) as engine:
        assert [r["rank_in_group"] for r in engine.weight_sync_ranks()] == [0, 1]
        trainer = Trainer(world_size=3, helper=True)
        try:
            engine.init_weights_update_group("127.0.0.1", trainer.port, 1, 3, backend="gloo", timeout=60)
            assert trainer.results.get(timeout=30) == "joined"
            trainer.broadcast(file_b)
            assert engine.update_weights_from_distributed(*meta_b, timeout=60) == 1
            assert trainer.results.get(timeout=30) == "sent"
            assert tokens(engine) == exp[b]
            engine.destroy_weights_update_group()
        finally:
            trainer.close()


def test_a_late_trainer_does_not_get_the_replica_taken_for_dead(ckpt, tmp_path):
    """The rank loop waits in the join and in the first receive; the leader keeps showing signs of life,
    so a trainer that comes (and broadcasts) later than heartbeat_timeout_s costs no restart."""
    a, b, exp = ckpt
    file_b, meta_b = one_file(b, tmp_path)
    with Engine(model=a, heartbeat_timeout_s=2.0, **OPTS) as engine:
        trainer = Trainer(world_size=2, delay_s=4.0)
        try:
            engine.init_weights_update_group("127.0.0.1", trainer.port, 1, 2, backend="gloo", timeout=60)
            assert trainer.results.get(timeout=30) == "joined"
            threading.Timer(4.0, trainer.broadcast, args=(file_b,)).start()
            assert engine.update_weights_from_distributed(*meta_b, timeout=60) == 1
            assert trainer.results.get(timeout=30) == "sent"
            assert tokens(engine) == exp[b]
            stats = engine.stats()
            assert stats["replica_restarts"] == 0 and all(r["alive"] for r in stats["replicas"])
        finally:
            trainer.close()
