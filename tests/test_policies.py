"""Routing policies and the front end's per-replica load estimate (pure Python, no processes)."""

from __future__ import annotations

from collections import Counter

import pytest

from flotilla.ipc.messages import ReplicaLoad
from flotilla.router.policies import (POLICIES, LeastTokens, NoReplicaAvailable, Policy, PrefixAware,
                                      PrefixTracker, ReplicaView, RoundRobin, ShortestQueue, make_policy)

PREFIX = list(range(1000, 1128))  # 128 tokens = 8 pages of 16


def views(n: int, **kw) -> list[ReplicaView]:
    return [ReplicaView(i, **kw) for i in range(n)]


def route(policy: Policy, vs: list[ReplicaView], prompt: list[int], max_new: int = 16) -> int:
    """What the DPController does per request: select, account locally, tell the policy."""
    rid = policy.select(vs, prompt, max_new)
    next(v for v in vs if v.replica_id == rid).on_dispatch(len(prompt), max_new)
    policy.on_dispatch(rid, prompt)
    return rid


# ------------------------------------------------------------------------------------------ registry
def test_registry_and_protocol():
    assert set(POLICIES) == {"round_robin", "shortest_queue", "least_tokens", "prefix_aware"}
    for name in POLICIES:
        p = make_policy(name)
        assert isinstance(p, Policy)
        assert type(p).name == name


def test_unknown_policy_names_load_balance():
    with pytest.raises(ValueError) as e:
        make_policy("random")
    msg = str(e.value)
    assert "load_balance" in msg and "random" in msg
    for name in POLICIES:
        assert name in msg


def test_make_policy_kwargs():
    p = make_policy("prefix_aware", page_size=8, min_match_tokens=8)
    assert isinstance(p, PrefixAware) and p.tracker.page_size == 8 and p.min_match_tokens == 8
    # another policy's option is ignored, so a caller can pass its settings unconditionally
    assert isinstance(make_policy("round_robin", page_size=8), RoundRobin)
    with pytest.raises(TypeError, match="pag_size"):
        make_policy("prefix_aware", pag_size=8)


# ------------------------------------------------------------------------------------------ eligibility
@pytest.mark.parametrize("name", list(POLICIES))
def test_dead_and_draining_never_chosen(name):
    p = make_policy(name)
    vs = [ReplicaView(0, alive=False), ReplicaView(1, accepting=False, outstanding_tokens=0),
          ReplicaView(2, running=50, waiting=50, outstanding_tokens=100_000), ReplicaView(3, alive=False)]
    for i in range(20):
        assert route(p, vs, PREFIX + [i]) == 2


@pytest.mark.parametrize("name", list(POLICIES))
def test_no_eligible_replica(name):
    p = make_policy(name)
    with pytest.raises(NoReplicaAvailable):
        p.select([], [1, 2, 3], 4)
    with pytest.raises(NoReplicaAvailable):
        p.select([ReplicaView(0, alive=False), ReplicaView(1, accepting=False)], [1, 2, 3], 4)
    assert issubclass(NoReplicaAvailable, RuntimeError)


# ------------------------------------------------------------------------------------------ per policy
def test_round_robin_cycles_and_stays_fair_when_set_changes():
    p = RoundRobin()
    vs = views(3)
    assert [p.select(vs, [1], 1) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    vs[1].accepting = False  # draining: skipped, the others keep alternating
    assert [p.select(vs, [1], 1) for _ in range(4)] == [0, 2, 0, 2]
    vs[1].accepting = True
    vs.append(ReplicaView(3))  # a new replica joins the cycle at its place
    assert [p.select(vs, [1], 1) for _ in range(6)] == [3, 0, 1, 2, 3, 0]
    del vs[1]  # removed right after the cursor: no repeat, no skip
    p.forget_replica(1)
    assert [p.select(vs, [1], 1) for _ in range(4)] == [2, 3, 0, 2]


def test_round_robin_ignores_load():
    p = RoundRobin()
    vs = [ReplicaView(0, running=100), ReplicaView(1)]
    assert [p.select(vs, [1], 1) for _ in range(4)] == [0, 1, 0, 1]


def test_shortest_queue_picks_min_running_plus_waiting():
    vs = [ReplicaView(0, running=4, waiting=3), ReplicaView(1, running=6, waiting=0, outstanding_tokens=10**6),
          ReplicaView(2, running=1, waiting=7)]
    assert ShortestQueue().select(vs, [1], 1) == 1
    # ties rotate instead of always taking the lowest id
    p = ShortestQueue()
    tied = views(3, running=2)
    assert [p.select(tied, [1], 1) for _ in range(4)] == [0, 1, 2, 0]


def test_least_tokens_picks_min_outstanding():
    vs = [ReplicaView(0, running=1, outstanding_tokens=9000), ReplicaView(1, running=9, outstanding_tokens=500),
          ReplicaView(2, running=0, outstanding_tokens=700)]
    assert LeastTokens().select(vs, [1], 1) == 1
    # equal tokens: fewer requests wins
    vs = [ReplicaView(0, running=3, outstanding_tokens=100), ReplicaView(1, running=1, outstanding_tokens=100)]
    assert LeastTokens().select(vs, [1], 1) == 1


@pytest.mark.parametrize("name", ["shortest_queue", "least_tokens"])
def test_burst_between_reports_spreads_evenly(name):
    p = make_policy(name)
    vs = views(2)
    counts = Counter(route(p, vs, [7] * 100, 50) for _ in range(8))
    assert counts == {0: 4, 1: 4}
    assert [v.waiting for v in vs] == [4, 4]
    assert [v.outstanding_tokens for v in vs] == [600, 600]


def test_least_tokens_burst_with_uneven_sizes():
    """One huge request on replica 0 should be balanced by several small ones on replica 1."""
    p = LeastTokens()
    vs = views(2)
    assert route(p, vs, [1] * 4000, 96) == 0
    assert [route(p, vs, [1] * 100, 0) for _ in range(5)] == [1] * 5


# ------------------------------------------------------------------------------------------ the view
def test_view_report_replaces_estimate_and_keeps_unseen_dispatches():
    v = ReplicaView(0)
    for _ in range(5):
        v.on_dispatch(10, 10)
    assert (v.running, v.waiting, v.outstanding_tokens, v.inflight) == (0, 5, 100, 5)
    # the replica has seen 3 of them: the 2 newest are still in transit and stay counted
    v.on_report(ReplicaLoad(running=3, waiting=0, outstanding_tokens=45, kv_used=0.5))
    assert (v.running, v.waiting, v.outstanding_tokens, v.pending) == (3, 2, 85, 2)
    assert v.kv_used == 0.5
    # a dispatch after the report adds on top
    v.on_dispatch(100, 0)
    assert (v.waiting, v.outstanding_tokens) == (3, 185)
    # the next report has everything: nothing pending any more
    v.on_report(ReplicaLoad(running=6, waiting=0, outstanding_tokens=150))
    assert (v.running, v.waiting, v.outstanding_tokens, v.pending) == (6, 0, 150, 0)


def test_view_report_then_finish_in_same_step():
    """The controller applies a step's report before retiring that step's finished requests."""
    v = ReplicaView(0)
    for _ in range(4):
        v.on_dispatch(10, 10)
    # all 4 arrived, one finished in this step: the report shows 3 running
    v.on_report(ReplicaLoad(running=3, waiting=0, outstanding_tokens=40))
    v.on_finish()
    assert (v.running, v.waiting, v.outstanding_tokens, v.inflight) == (3, 0, 40, 3)
    for _ in range(3):
        v.on_finish()
    v.on_report(ReplicaLoad())
    assert (v.running, v.waiting, v.outstanding_tokens, v.inflight) == (0, 0, 0, 0)
    v.on_finish()  # a spurious finish never goes negative
    assert v.inflight == 0


def test_view_pending_expires_after_a_few_reports():
    """Even if the inflight count drifted (a finish never reported), pending dispatches cannot pile up."""
    v = ReplicaView(0, pending_ttl_reports=2)
    v.inflight = 100  # drifted: the count-consistency rule alone would keep everything
    v.on_dispatch(10, 0)
    v.on_report(ReplicaLoad(running=1, outstanding_tokens=5))
    assert v.waiting == 1
    v.on_report(ReplicaLoad(running=1, outstanding_tokens=5))
    assert (v.waiting, v.outstanding_tokens) == (0, 5)


def test_view_crafted_values_act_as_first_report():
    v = ReplicaView(3, running=2, waiting=1, outstanding_tokens=300)
    v.on_dispatch(50, 50)
    assert (v.running, v.waiting, v.outstanding_tokens) == (2, 2, 400)
    assert v.queue_len == 4 and v.eligible


# ------------------------------------------------------------------------------------------ prefix aware
def test_prefix_aware_keeps_shared_prefix_together():
    p = PrefixAware(page_size=16, min_match_tokens=64)
    vs = views(4)
    first = route(p, vs, PREFIX + [1, 2, 3])
    for i in range(6):
        # different suffixes, same 128-token prefix: same replica despite its growing load
        assert route(p, vs, PREFIX + [50 + i] * 20) == first
    # an unrelated prompt goes to the least loaded replica instead
    other = route(p, vs, list(range(5000, 5200)))
    assert other != first
    assert vs[other].outstanding_tokens == 216


def test_prefix_aware_prefers_longest_match():
    p = PrefixAware(page_size=16, min_match_tokens=32)
    vs = views(3)
    p.on_dispatch(0, PREFIX[:64] + [9] * 64)  # shares 4 pages with PREFIX
    p.on_dispatch(2, PREFIX)  # shares all 8 pages
    assert p.tracker.match(PREFIX + [1], [0, 1, 2]) == {0: 64, 1: 0, 2: 128}
    assert p.select(vs, PREFIX + [1], 16) == 2


def test_prefix_aware_short_match_falls_back():
    p = PrefixAware(page_size=16, min_match_tokens=64)
    vs = [ReplicaView(0, outstanding_tokens=10), ReplicaView(1, outstanding_tokens=0)]
    p.on_dispatch(0, PREFIX[:48])  # 3 pages = 48 tokens < 64
    assert p.select(vs, PREFIX, 16) == 1
    p.on_dispatch(0, PREFIX[:64])
    assert p.select(vs, PREFIX, 16) == 0


def test_prefix_aware_falls_back_when_overloaded():
    p = PrefixAware(page_size=16, min_match_tokens=64, imbalance_threshold=1000, imbalance_ratio=0.5)
    p.on_dispatch(0, PREFIX)
    # within the absolute margin: affinity wins
    vs = [ReplicaView(0, outstanding_tokens=900), ReplicaView(1, outstanding_tokens=0)]
    assert p.select(vs, PREFIX, 16) == 0
    # beyond it: least_tokens
    vs = [ReplicaView(0, outstanding_tokens=1100), ReplicaView(1, outstanding_tokens=0)]
    assert p.select(vs, PREFIX, 16) == 1
    # heavily loaded system: the relative margin (0.5 * 10000) applies
    vs = [ReplicaView(0, outstanding_tokens=14_000), ReplicaView(1, outstanding_tokens=10_000)]
    assert p.select(vs, PREFIX, 16) == 0
    vs = [ReplicaView(0, outstanding_tokens=16_000), ReplicaView(1, outstanding_tokens=10_000)]
    assert p.select(vs, PREFIX, 16) == 1
    # a matching replica that is draining is not used
    vs = [ReplicaView(0, accepting=False), ReplicaView(1, outstanding_tokens=10_000), ReplicaView(2)]
    assert p.select(vs, PREFIX, 16) == 2


def test_prefix_aware_hot_prefix_overflows_then_spreads():
    """A burst on one prefix stays put until the imbalance margin, then the prefix spreads to a second
    replica, and later requests go to whichever holder is less loaded."""
    p = PrefixAware(page_size=16, min_match_tokens=64, imbalance_threshold=600, imbalance_ratio=0.0)
    vs = views(2)
    chosen = [route(p, vs, PREFIX + [i], 16) for i in range(12)]
    assert chosen[:5] == [0] * 5  # 5 * 145 = 725: the 6th sees 725 - 0 > 600 and overflows
    assert chosen[5] == 1
    assert p.tracker.match(PREFIX, [0, 1]) == {0: 128, 1: 128}
    c = Counter(chosen)
    assert abs(c[0] - c[1]) <= 5


def test_prefix_aware_forgets_removed_and_dead_replicas():
    p = PrefixAware(page_size=16, min_match_tokens=64)
    p.on_dispatch(0, PREFIX)
    p.on_dispatch(1, PREFIX)
    p.forget_replica(0)
    assert p.tracker.entries(0) == 0 and p.tracker.entries(1) == 8 and len(p.tracker) == 8
    vs = [ReplicaView(1, alive=False), ReplicaView(2, outstanding_tokens=5), ReplicaView(3)]
    assert p.select(vs, PREFIX, 16) == 3  # no usable match: least_tokens
    assert len(p.tracker) == 0  # the dead replica's (stale) cache knowledge is gone


def test_prefix_tracker_bounded_lru():
    t = PrefixTracker(page_size=4, max_entries=10)
    a, b = list(range(0, 16)), list(range(100, 116))  # 4 pages each
    t.insert(0, a)
    t.insert(1, b)
    assert len(t) == 8
    t.insert(0, a)  # touch a: b is now the least recently used
    t.insert(2, list(range(200, 216)))  # 4 more pages: evicts two of b's, deepest first
    assert len(t) == 10 and t.entries(1) == 2
    assert t.match(a, [0]) == {0: 16}
    assert t.match(b, [1]) == {1: 8}  # lost its two deepest pages, keeps the shared root
    for i in range(200):
        t.insert(i % 5, list(range(i * 40, i * 40 + 40)))
        assert len(t) <= 10
    assert sum(t.entries(r) for r in range(5)) == len(t) <= 10


def test_prefix_tracker_pages_and_capacity():
    t = PrefixTracker(page_size=16)
    assert t.page_hashes(list(range(15))) == []  # partial pages are not cacheable
    assert len(t.page_hashes(list(range(40)))) == 2
    # chained: the same page after different prefixes is a different entry
    assert t.page_hashes([1] * 16 + [2] * 16)[1] != t.page_hashes([3] * 16 + [2] * 16)[1]
    t.insert(0, list(range(160)))
    assert t.entries(0) == 10
    t.set_replica_capacity(0, 4)
    assert t.entries(0) == 4 and len(t) == 4
    assert t.match(list(range(160)), [0]) == {0: 64}
    # a replica reporting its KV size caps its entries the same way
    p = PrefixAware(page_size=16)
    p.on_dispatch(0, list(range(160)))
    p.select([ReplicaView(0, kv_total_tokens=48)], [1], 1)
    assert p.tracker.entries(0) == 3


def test_prefix_aware_with_controller_flow_and_reports():
    """Reports interleaved with a burst: affinity holds, the estimate follows the reports."""
    p = make_policy("prefix_aware", page_size=16, min_match_tokens=64, imbalance_threshold=10_000)
    vs = views(2)
    for i in range(4):
        assert route(p, vs, PREFIX + [i]) == 0
    vs[0].on_report(ReplicaLoad(running=4, outstanding_tokens=4 * 16))
    assert (vs[0].waiting, vs[0].outstanding_tokens) == (0, 64)
    assert route(p, vs, list(range(9000, 9100))) == 1
    assert route(p, vs, PREFIX + [99]) == 0
