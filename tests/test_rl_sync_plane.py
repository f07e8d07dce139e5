"""The front end's weight-sync bookkeeping without processes: how engine ranks are numbered for every
layout, which message each leader gets, the IPC per-rank mapping, the refusals, and the meta model of a
llama 3 shape (its rope scaling computes on the CPU while it is built)."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from types import SimpleNamespace

import pytest

from flotilla.ipc.messages import CommitWeights, InitWeightSyncGroup, IpcSource, IpcTensor, UpdateWeights
from flotilla.launch.topology import layout
from flotilla.router.fleet import GroupRecord, GroupState
from flotilla.weights.updater import WeightUpdater


class FakeFleet:
    """What the weights package asks of the fleet (``FleetView``), over records like the fleet's own."""

    def __init__(self, records):
        self.records = records

    def ready_replicas(self):
        return {t for r in self.records if r.state is GroupState.READY for t in r.spec.replicas}

    def rank_layout(self):
        rows = []
        for rec in self.records:
            if rec.state is not GroupState.READY:
                raise RuntimeError(f"weight sync: replica group {rec.spec.group_id} is {rec.state.value}; "
                                   "retry once every replica in stats() is ready")
            rows.extend((rec.spec.replica_of_rank(r), rec.spec.group_id, r) for r in range(rec.spec.world_size))
        return sorted(rows)


class FakePlane:
    """What the weights package uses of the ControlPlane (``ControlPort``): the lock, the op round trip,
    holding the engine paused, the memory state, the store probe."""

    def __init__(self, specs, device="cuda", states=None):
        records = [GroupRecord(s, (states or {}).get(s.group_id, GroupState.READY)) for s in specs]
        self.fleet = FakeFleet(records)
        self.config = SimpleNamespace(device=device, dtype="float32")
        self.lock = threading.RLock()
        self.memory_released = False
        self.sent: list = []
        self.probed: list = []
        self.weights = WeightUpdater(self.config, self, self.fleet, "/tmp/flotilla-test-none", None, True,
                                     checker=SimpleNamespace(check=lambda items: True))

    def probe_store(self, host, port, timeout_s):
        self.probed.append((host, port, timeout_s))

    def run_op(self, name, timeout, *, make=None, make_for=None, check=True, targets=None):
        for t in sorted(targets or self.fleet.ready_replicas()):
            self.sent.append((t, make(1) if make_for is None else make_for(1, t)))

    def held(self, timeout):
        return nullcontext()

    @property
    def files_shared(self):
        return self.weights.files_shared

    @files_shared.setter
    def files_shared(self, value):
        self.weights.files_shared = value


def WeightSync(plane):  # noqa: N802 - the groups and the updates of one fake plane, as one object
    w = plane.weights
    return SimpleNamespace(plane=plane, layout=w.layout, init_group=w.groups.init_group,
                           destroy_group=w.groups.destroy_group, groups=w.groups.groups,
                           update_from_distributed=w.update_from_distributed, update_from_ipc=w.update_from_ipc)


def ranks(specs) -> list[tuple[int, int, int]]:
    return [(s.index, s.replica, s.rank) for s in WeightSync(FakePlane(specs)).layout()]


def test_rank_order_is_replica_then_rank_for_every_layout():
    assert ranks(layout(1, 2, False)) == [(0, 0, 0), (1, 1, 0)]
    assert ranks(layout(2, 2, False)) == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    # DP attention: one group of 4 ranks, replicas 0 and 1 led by ranks 0 and 2
    assert ranks(layout(4, 2, True)) == [(0, 0, 0), (1, 0, 1), (2, 1, 2), (3, 1, 3)]
    # pipeline: each replica's tp x pp ranks, stage-major
    assert ranks(layout(1, 2, False, pp_size=2)) == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]


def test_each_leader_gets_its_groups_ranks():
    plane = FakePlane(layout(2, 2, False))
    WeightSync(plane).init_group("10.0.0.1", 29500, rank_offset=3, world_size=7, backend="nccl")
    msgs = {t: m for t, m in plane.sent}
    assert all(isinstance(m, InitWeightSyncGroup) for m in msgs.values())
    assert msgs[0].ranks == [3, 4] and msgs[1].ranks == [5, 6]
    assert msgs[0].world_size == 7 and msgs[0].master_address == "10.0.0.1" and msgs[0].backend == "nccl"
    assert plane.probed == [("10.0.0.1", 29500, 30.0)] and msgs[0].connect_timeout_s == 30.0
    plane = FakePlane(layout(4, 2, True))  # two leaders of one group: the same list, indexed by group rank
    WeightSync(plane).init_group("127.0.0.1", 29500, rank_offset=1, world_size=5, backend="nccl")
    assert [m.ranks for _, m in plane.sent] == [[1, 2, 3, 4], [1, 2, 3, 4]]


def test_init_refusals():
    sync = WeightSync(FakePlane(layout(1, 2, False), states={1: GroupState.RESTARTING}))
    with pytest.raises(RuntimeError, match="replica group 1 is restarting"):
        sync.init_group("127.0.0.1", 29500, 1, 3, backend="nccl")
    sync = WeightSync(FakePlane(layout(1, 2, False)))
    with pytest.raises(ValueError, match="needs >= 3"):
        sync.init_group("127.0.0.1", 29500, 1, 2, backend="nccl")
    with pytest.raises(ValueError, match="master_address"):
        sync.init_group("tcp://x", 29500, 1, 3, backend="nccl")
    with pytest.raises(ValueError, match="device='cuda'"):
        WeightSync(FakePlane(layout(1, 1, False), device="cpu")).init_group("127.0.0.1", 29500, 1, 2, backend="nccl")
    assert not sync.plane.sent and not sync.groups


def test_a_failed_join_makes_every_rank_leave():
    plane = FakePlane(layout(1, 2, False))
    calls = []

    def control(name, timeout, *, make=None, make_for=None, check=True, targets=None):
        calls.append((name, check, sorted(targets or [])))
        if name == "init_weights_update_group":
            raise RuntimeError("init_weights_update_group failed: replica 1: rank 0: joining ... failed")

    plane.run_op = control
    sync = WeightSync(plane)
    with pytest.raises(RuntimeError, match="replica 1"):
        sync.init_group("127.0.0.1", 29500, 1, 3, backend="nccl")
    assert calls[1] == ("destroy_weights_update_group", False, [0, 1]) and not sync.groups


def test_a_group_is_bound_to_its_replicas():
    plane = FakePlane(layout(1, 2, False))
    sync = WeightSync(plane)
    sync.init_group("127.0.0.1", 29500, 1, 3, backend="nccl")
    plane.fleet.records[1].spec = plane.fleet.records[1].spec.renumbered(5, [7])  # replica 1 came back as 7
    plane.sent.clear()
    with pytest.raises(RuntimeError, match="destroy_weights_update_group"):
        sync.update_from_distributed(["model.norm.weight"], ["bfloat16"], [[64]])
    assert not plane.sent
    sync.destroy_group()  # reaches the replica still in it only
    assert [t for t, _ in plane.sent] == [0]


def handle(name: str, device: int = 0) -> IpcTensor:
    return IpcTensor(name, "bfloat16", [64], [1], 0, device, b"h", 128, 0, b"r", 0, b"", False)


def test_ipc_lists_map_onto_group_ranks():
    plane = FakePlane(layout(2, 2, False))
    sync = WeightSync(plane)
    per_rank = [[handle("model.norm.weight", d)] for d in range(4)]
    assert sync.update_from_ipc(per_rank) == 1
    msgs = {t: m for t, m in plane.sent if isinstance(m, UpdateWeights)}
    assert all(isinstance(m.source, IpcSource) for m in msgs.values())
    assert [[x.device for x in lst] for lst in msgs[0].source.tensors] == [[0], [1]]
    assert [[x.device for x in lst] for lst in msgs[1].source.tensors] == [[2], [3]]
    assert {t for t, m in plane.sent if isinstance(m, CommitWeights)} == {0, 1}  # staged everywhere: committed
    plane.sent.clear()
    sync.update_from_ipc([handle("model.norm.weight")])  # one list: every rank reads it
    assert all(len(m.source.tensors) == 1 for _, m in plane.sent if isinstance(m, UpdateWeights))
    with pytest.raises(ValueError, match="3 per-rank lists for 4 engine ranks"):
        sync.update_from_ipc(per_rank[:3])
    with pytest.raises(ValueError, match="differ"):
        sync.update_from_ipc([[handle("model.norm.weight")], [handle("lm_head.weight")]] * 2)
    with pytest.raises(ValueError, match="IpcTensor"):
        sync.update_from_ipc([("model.norm.weight", 1)])
    plane.files_shared = False
    with pytest.raises(ValueError, match="other nodes"):
        sync.update_from_ipc(per_rank)


def test_meta_model_of_a_llama3_shape():
    """llama-3.1-8b's rope scaling computes its frequencies on the CPU while the model is built, which
    torch.device("meta") refuses; the meta model must build anyway, all on meta, loaders kept."""
    from flotilla.config import EngineConfig
    from flotilla.model.shapes import write_shape
    from flotilla.weights.check import WeightChecker

    cfg = EngineConfig.from_kwargs(str(write_shape("llama-3.1-8b")), device="cpu", load_format="dummy",
                                   max_model_len=2048).resolve()
    router, expected = WeightChecker(cfg).meta_model()
    assert {p.device.type for p in router.params.values()} == {"meta"}
    qkv = next(p for n, p in router.params.items() if n.endswith("qkv_proj.weight"))
    assert hasattr(qkv, "weight_loader") and len(expected) > 200
