"""DP attention's collectives on CPU (gloo): the reduce-scatter path (padded and compacted layouts) equals the
old all-reduce-and-slice reference, idle groups and uneven counts included; the varlen all-gather and
reduce-scatter are inverses of each other's layout."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

H = 8


class PartialLinear(torch.nn.Module):
    """A stand-in for a TP-sharded MLP: rank r holds W_r; the full output is x @ sum_r W_r."""

    def __init__(self, rank: int):
        super().__init__()
        self.w = torch.randn(H, H, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        from flotilla.distributed import get_group

        y = x @ self.w
        return get_group("tp").all_reduce(y) if reduce else y


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, attn_tp: int, port: int, cases: list[list[int]], failures) -> None:
    from flotilla.distributed.dp_attention import dp_attention_mlp, dp_attention_mlp_reference
    from flotilla.distributed.groups import destroy_groups, get_group, init_groups

    init_groups(rank, world, f"tcp://127.0.0.1:{port}", "gloo", attn_tp_size=attn_tp, timeout_s=60)
    try:
        dp = get_group("attn_dp")
        mlp = PartialLinear(rank)
        for counts in cases:
            # every rank of one attention-DP group holds the same tokens
            x = torch.randn(counts[dp.rank], H, generator=torch.Generator().manual_seed(dp.rank * 7 + len(counts)),
                            dtype=torch.float64)
            want = dp_attention_mlp_reference(counts)(mlp, x)
            for padded in (True, False):
                got = dp_attention_mlp(counts, padded=padded)(mlp, x)
                if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-12, atol=1e-12):
                    failures.append((rank, counts, padded))
            full = dp.all_gather_varlen(x, counts)
            back = dp.reduce_scatter_varlen(full, counts)
            if not torch.allclose(back, x * dp.size):
                failures.append((rank, counts, "gather/scatter"))
    finally:
        destroy_groups()


@pytest.mark.parametrize("world,attn_tp", [(2, 1), (4, 2)])
def test_reduce_scatter_matches_all_reduce(world, attn_tp):
    cases = [[3, 3], [5, 1], [0, 4], [7, 0], [1, 1]]
    with mp.Manager() as manager:
        failures = manager.list()
        mp.spawn(_worker, args=(world, attn_tp, _free_port(), cases, failures), nprocs=world, join=True)
        assert list(failures) == []


def test_padded_layout_choice():
    from flotilla.distributed.dp_attention import padded_layout

    assert padded_layout([4, 4])
    assert padded_layout([5, 4])
    assert not padded_layout([8, 0])


def test_dp_replay_size():
    """Every rank replays the bucket of the largest group's batch; an idle group replays it too; any group
    that cannot replay sends every rank down the eager path."""
    from flotilla.worker.cuda_graph import dp_replay_size, graph_batch_sizes

    sizes = graph_batch_sizes(64)
    assert dp_replay_size(sizes, [3, 0], [True, True]) == 4
    assert dp_replay_size(sizes, [0, 17], [True, True]) == 32
    assert dp_replay_size(sizes, [0, 0], [True, True]) == 1
    assert dp_replay_size(sizes, [5, 2], [True, False]) is None
    assert dp_replay_size(sizes, [65, 1], [True, True]) is None
