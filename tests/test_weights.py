"""Weight updates as one subsystem (flotilla/weights/, issue 26): the tagged-union message, the checker, the
ledger, the rank side's stage -> agree -> commit in one process, and an engine whose file update fails mid-way
on one rank (of one replica, then of a TP group) keeping the old weights everywhere."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import msgspec
import pytest
import torch
from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from safetensors.torch import save_file

from flotilla.ipc.messages import (
    BatchPlan,
    BroadcastSource,
    CommitWeights,
    DiscardWeights,
    FileSource,
    IpcSource,
    IpcTensor,
    StagedSource,
    UpdateWeights,
    batch_plan_decoder,
    encoder,
    to_worker_decoder,
)

N = 12


def weights(path: str) -> dict[str, torch.Tensor]:
    from test_weight_update import weights as load

    return load(path)


# ---------------------------------------------------------------------------------------------- the message
SOURCES = [FileSource("/ckpt/step1"), StagedSource("staged-abc"),
           BroadcastSource("weight_update_group", ["model.norm.weight"], ["bfloat16"], [[64]]),
           IpcSource([[IpcTensor("model.norm.weight", "bfloat16", [64], [1], 0, 0, b"h", 128, 0, b"r", 0, b"", False,
                                 "GPU-1")]])]


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: type(s).__name__)
def test_update_weights_source_is_a_tagged_union_that_round_trips(source):
    msg = UpdateWeights(7, source, 3, flush_cache=False)
    back = to_worker_decoder.decode(encoder.encode(msg))
    assert type(back) is UpdateWeights and type(back.source) is type(source) and back == msg
    raw = msgspec.msgpack.decode(encoder.encode(msg))
    assert raw["type"] == "UpdateWeights" and raw["source"]["type"] == type(source).__name__
    plan = batch_plan_decoder.decode(encoder.encode(BatchPlan([], kind="idle", op=msg)))  # to the TP peers
    assert plan.op == msg


def test_commit_and_discard_round_trip_and_a_bare_string_source_is_refused():
    for msg in (CommitWeights(8, 7, 3, True), DiscardWeights(9, 7)):
        assert to_worker_decoder.decode(encoder.encode(msg)) == msg
    bad = msgspec.msgpack.encode({"type": "UpdateWeights", "op_id": 1, "source": "/ckpt", "version": 1})
    with pytest.raises(msgspec.ValidationError):
        to_worker_decoder.decode(bad)
    assert not any(issubclass(t, UpdateWeights) for t in (CommitWeights, DiscardWeights))


def test_every_source_has_one_transport():
    from flotilla.weights.transport import WeightTransport, transports

    table = transports()
    assert set(table) == {FileSource, StagedSource, BroadcastSource, IpcSource}
    assert all(issubclass(t, WeightTransport) for t in table.values())


# ---------------------------------------------------------------------------------------------- the checker
@pytest.fixture(scope="module")
def checker():
    from flotilla.config import EngineConfig
    from flotilla.weights.check import WeightChecker

    cfg = EngineConfig.from_kwargs(tiny("llama", seed=0), device="cpu", dtype="float32").resolve()
    return WeightChecker(cfg)


def test_the_checker_refuses_bad_names_shapes_and_dtypes_naming_the_tensor(checker):
    good = weights(tiny("llama", seed=1))
    assert checker.check(good.items()) is True  # every weight: full
    assert checker.check([("model.norm.weight", good["model.norm.weight"])]) is False  # a subset
    q = "model.layers.1.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match=q):
        checker.check(dict(good, **{q: good[q][:32]}).items())
    with pytest.raises(ValueError, match="model.layers.0.self_attn.nope.weight"):
        checker.check([("model.layers.0.self_attn.nope.weight", torch.zeros(4))])
    with pytest.raises(ValueError, match="model.norm.weight.*not a floating-point"):
        checker.check([("model.norm.weight", torch.ones(64, dtype=torch.int64))])
    with pytest.raises(ValueError, match="model.norm.weight.*more than once"):
        checker.check([("model.norm.weight", good["model.norm.weight"])] * 2)
    with pytest.raises(ValueError, match="no tensors"):
        checker.check([])
    # metadata (a trainer's names/shapes/dtypes, a header) goes through the same check
    shape = list(good[q].shape)
    assert checker.check_meta([(q, shape, "bfloat16")]) is False
    with pytest.raises(ValueError, match=q):
        checker.check_meta([(q, [shape[0] // 2, shape[1]], "bfloat16")])
    with pytest.raises(ValueError, match=f"{q}.*int32"):
        checker.check_meta([(q, shape, "int32")])


def test_every_transport_describes_for_the_same_check(checker, tmp_path):
    from flotilla.weights.broadcast import BroadcastTransport
    from flotilla.weights.file import FileTransport
    from flotilla.weights.ipc import IpcTransport

    q = "model.layers.1.self_attn.q_proj.weight"
    save_file({q: torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    bad = [FileTransport.from_path(tmp_path), BroadcastTransport("g", [q], ["float32"], [[4, 4]]),
           IpcTransport([[IpcTensor(q, "float32", [4, 4], [4, 1], 0, 0, b"", 64, 0, b"", 0, b"", False)]],
                        lambda r: [])]
    for transport in bad:
        with pytest.raises(ValueError, match=q):
            checker.check(transport.describe(1.0))


# ---------------------------------------------------------------------------------------------- the ledger
def test_the_ledger_owns_the_version_history_and_replay():
    from flotilla.weights.ledger import VersionLedger

    ledger = VersionLedger()
    assert ledger.version == 0 and ledger.next_version(None) == 1 and ledger.replay_args()["weights_sources"] == []
    with pytest.raises(ValueError, match="version"):
        ledger.next_version(-1)
    ledger.commit(1, "file", "/a", full=True)
    ledger.commit(5, "file", "/b", full=False)
    assert ledger.replay_args() == {"weights_sources": ["/a", "/b"], "weight_version": 5}
    ledger.commit(6, "file", "/c", full=True)
    assert ledger.replay_files() == {"/c"}
    ledger.commit(7, "broadcast", None, full=True)
    assert ledger.replay_args() == {"weights_sources": [], "weight_version": 0}
    assert [(e.version, e.transport) for e in ledger.history()] == [(1, "file"), (5, "file"), (6, "file"),
                                                                    (7, "broadcast")]


# ---------------------------------------------------------------------------------------------- rank side
@pytest.fixture
def runner():
    from transformers import AutoConfig

    from flotilla.model.loader import load_checkpoint
    from flotilla.model.models import model_class

    path = tiny("llama", seed=0)
    hf = AutoConfig.from_pretrained(path)
    m = model_class(hf.to_dict())(hf, max_positions=256)
    load_checkpoint(m, path)
    return SimpleNamespace(model=m, device=torch.device("cpu"), weights_offloaded=False)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_file_update_is_staged_then_committed_or_discarded(runner):
    from flotilla.weights import rank

    old = snapshot(runner.model)
    b = tiny("llama", seed=1)
    rank.run(UpdateWeights(11, FileSource(b), 1), runner, 0)
    assert same(snapshot(runner.model), old) and rank.staged_update().stage_id == 11  # staged only
    rank.run(DiscardWeights(12, 11), runner, 0)
    assert rank.staged_update() is None and same(snapshot(runner.model), old)
    with pytest.raises(RuntimeError, match="not staged"):
        rank.run(CommitWeights(13, 11, 1), runner, 0)
    rank.run(UpdateWeights(14, FileSource(b), 1), runner, 0)
    rank.run(CommitWeights(15, 14, 1), runner, 0)
    assert not same(snapshot(runner.model), old) and rank.staged_update() is None


def test_a_file_that_fails_mid_way_on_a_rank_touches_nothing(runner, monkeypatch):
    from flotilla.worker import faults
    from flotilla.weights import rank

    old = snapshot(runner.model)
    monkeypatch.setenv(faults.WEIGHTS, "3:0:0:5")
    with pytest.raises(ValueError, match="fault injected"):
        rank.run(UpdateWeights(21, FileSource(tiny("llama", seed=1)), 3), runner, 0)
    rank.undo(UpdateWeights(21, FileSource(""), 3))  # what the group does once any rank failed
    assert rank.staged_update() is None and same(snapshot(runner.model), old)


# ---------------------------------------------------------------------------------------------- an engine
def two_file_folder(src: str, dest) -> tuple[str, int]:
    """``src``'s weights as a checkpoint folder of two safetensors files (with an index); the number of
    tensors in the first file."""
    items = sorted(weights(src).items())
    half = len(items) // 2
    dest.mkdir()
    parts = {"model-00001-of-00002.safetensors": dict(items[:half]),
             "model-00002-of-00002.safetensors": dict(items[half:])}
    for name, part in parts.items():
        save_file(part, str(dest / name))
    index = {"weight_map": {n: f for f, part in parts.items() for n in part}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(dest), half


@pytest.fixture(scope="module")
def ckpt():
    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    exp = {p: [hf_greedy(p, hf_tokenize(p, x), N) for x in PROMPTS] for p in (a, b)}
    assert exp[a] != exp[b]
    return a, b, exp


def test_a_file_update_that_fails_mid_way_on_one_rank_leaves_the_old_weights_everywhere(ckpt, tmp_path):
    from flotilla import Engine, SamplingParams
    from flotilla.worker import faults

    a, b, exp = ckpt
    folder, first = two_file_folder(b, tmp_path / "b")
    greedy = SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)

    def tokens(engine):
        return [o["token_ids"] for o in engine.generate(PROMPTS, greedy, use_tqdm=False)]

    # v7: replica 1 (rank 0) fails at the first tensor of the second file while replica 0 staged everything;
    # v8: rank 1 of replica 0 fails while its rank 0 staged everything
    os.environ[faults.WEIGHTS] = f"7:1:0:{first},8:0:1:{first}"
    try:
        engine = Engine(model=a, tp_size=2, dp_size=2, device="cpu", dtype="float32")
    finally:
        del os.environ[faults.WEIGHTS]
    with engine:
        assert tokens(engine) == exp[a]
        # the leader names its own failure's reason, and a TP peer's failure by rank (its log has the reason)
        for version, why in ((7, r"replica 1: rank 0: .*fault injected"), (8, r"replica 0: rank\(s\) \[1\] failed")):
            with pytest.raises(RuntimeError, match=f"update_weights failed: {why}"):
                engine.update_weights_from_disk(folder, version=version)
            stats = engine.stats()
            assert stats["weight_version"] == 0 and [r["weight_version"] for r in stats["replicas"]] == [0, 0]
            assert not stats["paused"] and stats["control_op"] is None
            assert tokens(engine) == exp[a]  # the old weights on every rank of every replica
        assert engine.update_weights_from_disk(folder, version=9) == 9  # the engine still takes updates
        assert tokens(engine) == exp[b]
        assert [r["weight_version"] for r in engine.stats()["replicas"]] == [9, 9]
