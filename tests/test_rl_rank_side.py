"""The rank side of weight updates (flotilla/weights/rank.py, broadcast.py, ipc.py) in one process: staging then committing,
failures that leave every live parameter untouched, and which IPC list a rank reads."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny
from flotilla.weights import broadcast, ipc, rank


@pytest.fixture(scope="module")
def model():
    from transformers import AutoConfig

    from flotilla.model.loader import load_checkpoint
    from flotilla.model.models import model_class

    path = tiny("llama", seed=0)
    hf = AutoConfig.from_pretrained(path)
    m = model_class(hf.to_dict())(hf, max_positions=256)
    load_checkpoint(m, path)
    return m


def weights_of(seed: int) -> dict[str, torch.Tensor]:
    from test_weight_update import weights

    return weights(tiny("llama", seed=seed))


def new_weights() -> dict[str, torch.Tensor]:
    return weights_of(1)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nothing_changes_before_commit_and_everything_after(model):
    from flotilla.model.loader import WeightRouter

    old = snapshot(model)
    router = WeightRouter(model)
    staged = rank.Staged(1, 1, router, rank.stage(router, new_weights().items()))
    assert same(snapshot(model), old)  # staged only
    assert staged.commit() > 0
    now = snapshot(model)
    assert not same(now, old)
    # the same as loading the tensors directly
    WeightRouter(model).load(new_weights().items())
    assert same(snapshot(model), now)
    WeightRouter(model).load(weights_of(0).items())  # back to the fixture's weights


def test_a_failure_midway_leaves_the_old_weights(model):
    from flotilla.model.loader import WeightRouter

    old = snapshot(model)
    items = list(new_weights().items())

    def dies_halfway():
        yield from items[: len(items) // 2]
        raise RuntimeError("Connection closed by peer")

    with pytest.raises(RuntimeError, match="Connection closed"):
        rank.stage(WeightRouter(model), dies_halfway())
    q = next(n for n, _ in items if n.endswith("q_proj.weight"))
    bad = [(n, t[: t.shape[0] // 2] if n == q else t) for n, t in items]
    with pytest.raises(ValueError, match="q_proj"):
        rank.stage(WeightRouter(model), bad)
    assert same(snapshot(model), old)


def test_ipc_items_pick_the_ranks_list(monkeypatch):
    monkeypatch.setattr(ipc, "open_ipc", lambda t: t.device)
    from flotilla.ipc.messages import IpcTensor

    def h(d):
        return IpcTensor("w", "float32", [1], [1], 0, d, b"", 4, 0, b"", 0, b"", False)

    assert list(ipc.ipc_items([[h(5)]], 3)) == [("w", 5)]  # one list: every rank
    assert list(ipc.ipc_items([[h(0)], [h(1)]], 1)) == [("w", 1)]
    with pytest.raises(ValueError, match="none for rank 2"):
        list(ipc.ipc_items([[h(0)], [h(1)]], 2))


def test_dtype_names():
    assert broadcast.parse_dtype("bfloat16") is torch.bfloat16
    assert broadcast.parse_dtype("torch.float16") is torch.float16
    assert broadcast.parse_dtype(torch.float32) is torch.float32
    for bad in ("int64", "bogus", torch.int8):
        with pytest.raises(ValueError, match="dtypes"):
            broadcast.parse_dtype(bad)


def test_connect_and_join_refusals():
    with pytest.raises(ValueError, match="backend"):
        broadcast.connect("127.0.0.1", 1, 2, 1, "mpi", 1.0)
    with pytest.raises(ValueError, match="rank"):
        broadcast.connect("127.0.0.1", 1, 2, 2, "gloo", 1.0)
    with pytest.raises(ValueError, match="not joined"):
        broadcast.get("nope")
    assert not broadcast.leave("nope")


def test_ipc_device_found_by_uuid(monkeypatch):
    """A Ray actor numbers its GPUs from 0: the handle's GPU is found by UUID, not by the producer's index."""
    from types import SimpleNamespace

    from flotilla.ipc.messages import IpcTensor

    uuids = ["GPU-aaaa", "GPU-bbbb"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=uuids[i]))

    def h(index, uuid):
        return IpcTensor("w", "float32", [1], [1], 0, index, b"", 4, 0, b"", 0, b"", False, uuid)

    assert ipc.local_device(h(5, "GPU-bbbb")) == 1
    assert ipc.local_device(h(3, "")) == 3  # no UUID: the producer's index
    with pytest.raises(ValueError, match="does not see"):
        ipc.local_device(h(0, "GPU-cccc"))
