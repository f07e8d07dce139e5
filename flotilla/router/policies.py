"""Routing policies for data-parallel replicas, and the front end's estimate of each replica's load.

Everything here is pure bookkeeping: no I/O, no threads, no locks (the DPController serialises calls under
its own lock). A policy sees a list of :class:`ReplicaView` and returns the id of the replica that should
get the next request.

Why a local estimate at all: a replica reports its load (:class:`~flotilla.ipc.messages.ReplicaLoad`) only
after it steps, so a burst of requests routed between two reports would all see the same numbers and all
land on the same "least loaded" replica. ``ReplicaView`` therefore adds the requests dispatched since the
last report on top of that report, and drops them again once a later report must already contain them.
"""

from __future__ import annotations

import inspect
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from flotilla.ipc.messages import ReplicaLoad


class NoReplicaAvailable(RuntimeError):
    """No replica is both alive and accepting new requests (all dead, draining, or none registered)."""


# ============================================================================================ replica view
class _Pending(NamedTuple):
    """A request dispatched to a replica that no report has reflected yet (as far as the front end knows)."""

    tokens: int  # prompt tokens + decode budget: what it adds to the replica's outstanding_tokens
    seq: int  # the view's report count when it was dispatched (for the age-based safety net)


@dataclass
class ReplicaView:
    """The front end's estimate of one replica's load: its last report plus what was sent since.

    ``running``, ``waiting`` and ``outstanding_tokens`` are the *estimates* that policies route on. They are
    derived: every ``on_report`` / ``on_dispatch`` / ``on_finish`` recomputes them from the last report plus
    the still-pending dispatches (a view built with explicit values treats those values as its first
    report, which is what tests crafting views rely on). Requests not yet reflected in a report are counted
    as ``waiting``, since that is where they will be when the replica first sees them.

    Deciding when a dispatched request is "reflected" is the subtle part, because a report does not say
    which requests it contains. Two rules, either of which retires a pending entry (oldest first, since the
    channel to a replica is FIFO and the oldest dispatches are the ones a report most likely contains):

    1. Count consistency. ``inflight`` is the front end's own count of requests it has on this replica
       (dispatched minus finished). The replica's ``running + waiting`` is the subset it has already
       received, so at most ``inflight - (running + waiting)`` requests can still be in transit; pending
       entries beyond that are already in the report. This is re-evaluated on every change, so the order in
       which the controller applies a step's report and its finished requests does not matter.
    2. Age. A replica drains its inbox before every step and reports after it, so a request sent before
       ``pending_ttl_reports`` further reports arrived is certainly in them. This bounds the damage if
       ``inflight`` ever drifts (a finish the controller never reported), so the estimate cannot grow
       without bound.
    """

    replica_id: int
    alive: bool = True
    accepting: bool = True  # False while draining: keeps its requests, gets no new ones
    reserved_for: str | None = None  # kept for one request that runs alone (a suspect): no other is routed here
    running: int = 0
    waiting: int = 0
    outstanding_tokens: int = 0
    # straight from the last report (for stats and for policies that want them)
    kv_used: float = 0.0
    kv_total_tokens: int = 0
    cached_tokens: int = 0
    num_steps: int = 0
    # how many reports a pending dispatch may survive before it is assumed reflected (rule 2 above)
    pending_ttl_reports: int = 3
    # requests the front end has on this replica: dispatched and not finished (rule 1 above)
    inflight: int = field(init=False, default=0)
    reports: int = field(init=False, default=0)
    _base: ReplicaLoad = field(init=False, repr=False)
    _pending: deque[_Pending] = field(init=False, repr=False, default_factory=deque)
    _pending_tokens: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        self._base = ReplicaLoad(running=self.running, waiting=self.waiting,
                                 outstanding_tokens=self.outstanding_tokens, kv_used=self.kv_used,
                                 kv_total_tokens=self.kv_total_tokens, cached_tokens=self.cached_tokens,
                                 num_steps=self.num_steps)
        # A crafted view's initial requests are ones the front end knows about, or rule 1 would cap them.
        self.inflight = self.running + self.waiting

    # ------------------------------------------------------------------------------------------ queries
    @property
    def eligible(self) -> bool:
        """Can this replica take a new request right now?"""
        return self.alive and self.accepting and self.reserved_for is None

    @property
    def queue_len(self) -> int:
        """Requests on the replica or on their way to it (the shortest_queue metric)."""
        return self.running + self.waiting

    @property
    def pending(self) -> int:
        """Dispatches counted on top of the last report."""
        return self.waiting - self._base.waiting

    @property
    def last_report(self) -> ReplicaLoad:
        return self._base

    # ------------------------------------------------------------------------------------------ updates
    def on_report(self, load: ReplicaLoad) -> None:
        """A replica's report replaces the estimate; dispatches it cannot yet contain stay counted."""
        self.reports += 1
        self._base = load
        self.kv_used, self.kv_total_tokens = load.kv_used, load.kv_total_tokens
        self.cached_tokens, self.num_steps = load.cached_tokens, load.num_steps
        # Rule 1 with the count as it is now (it may still shrink when this step's finished requests are
        # retired right after; _refresh re-applies the cap then), so this only ever drops entries for good
        # that are certainly in the report.
        in_transit = max(0, self.inflight - (load.running + load.waiting))
        while len(self._pending) > in_transit:
            self._drop_oldest()
        while self._pending and self.reports - self._pending[0].seq >= self.pending_ttl_reports:
            self._drop_oldest()
        self._refresh()

    def on_dispatch(self, prompt_len: int, max_new_tokens: int) -> None:
        """Account a request just sent here, so the next routing decision already sees it."""
        tokens = max(0, int(prompt_len)) + max(0, int(max_new_tokens))
        self.inflight += 1
        self._pending.append(_Pending(tokens, self.reports))
        self._pending_tokens += tokens
        self._refresh()

    def on_finish(self) -> None:
        """A request on this replica finished (or failed/was aborted) as far as the front end knows.

        The report that came with it already excludes it, so only ``inflight`` changes; that can shrink the
        number of dispatches still believed in transit (rule 1).
        """
        self.inflight = max(0, self.inflight - 1)
        self._refresh()

    # ------------------------------------------------------------------------------------------ internals
    def _drop_oldest(self) -> None:
        self._pending_tokens -= self._pending.popleft().tokens

    def _refresh(self) -> None:
        base = self._base
        n = min(len(self._pending), max(0, self.inflight - (base.running + base.waiting)))
        skipped = len(self._pending) - n  # the oldest entries are the ones rule 1 says are reflected
        tokens = self._pending_tokens
        if skipped:
            tokens -= sum(p.tokens for p in itertools.islice(self._pending, skipped))
        self.running = base.running
        self.waiting = base.waiting + n
        self.outstanding_tokens = base.outstanding_tokens + tokens


# ============================================================================================ policies
@runtime_checkable
class Policy(Protocol):
    """What the DPController needs from a routing policy."""

    def select(self, views: list[ReplicaView], prompt_ids: list[int], max_new_tokens: int) -> int:
        """The id of an alive, accepting replica for this request; raises NoReplicaAvailable if none."""
        ...

    def on_dispatch(self, replica_id: int, prompt_ids: list[int]) -> None:
        """A request was sent to ``replica_id`` (chosen by select or forced by the caller)."""
        ...

    def forget_replica(self, replica_id: int) -> None:
        """The replica is gone: drop whatever the policy remembers about it."""
        ...


def eligible_views(views: Iterable[ReplicaView]) -> list[ReplicaView]:
    """Alive and accepting views, sorted by id (so every tie-break below is deterministic)."""
    out = sorted((v for v in views if v.eligible), key=lambda v: v.replica_id)
    if not out:
        raise NoReplicaAvailable("no replica is alive and accepting requests")
    return out


class _Rotor:
    """Round-robin cursor by replica id, not by list position.

    Remembering the last chosen *id* (and taking the next larger one, wrapping) stays fair when replicas
    come, go, die or drain: an index into a list would skip or repeat replicas whenever the list changes.
    """

    def __init__(self) -> None:
        self.last: int | None = None

    def pick(self, candidates: Sequence[ReplicaView]) -> int:
        """Next candidate after the last pick; ``candidates`` sorted by id and non-empty."""
        chosen = candidates[0]
        if self.last is not None:
            chosen = next((v for v in candidates if v.replica_id > self.last), candidates[0])
        self.last = chosen.replica_id
        return chosen.replica_id


class _BasePolicy:
    """No-op hooks for the stateless policies."""

    name = ""

    def on_dispatch(self, replica_id: int, prompt_ids: list[int]) -> None:
        pass

    def forget_replica(self, replica_id: int) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RoundRobin(_BasePolicy):
    """Cycle over eligible replicas, ignoring load: predictable, and fine for uniform traffic."""

    name = "round_robin"

    def __init__(self) -> None:
        self._rotor = _Rotor()

    def select(self, views: list[ReplicaView], prompt_ids: list[int], max_new_tokens: int) -> int:
        return self._rotor.pick(eligible_views(views))


class _MinBy(_BasePolicy):
    """Pick the replica minimising ``key``; exact ties rotate, so a burst onto idle replicas spreads out
    even before the per-dispatch accounting separates them."""

    key: Callable[[ReplicaView], tuple[int, ...]]

    def __init__(self) -> None:
        self._rotor = _Rotor()

    def select(self, views: list[ReplicaView], prompt_ids: list[int], max_new_tokens: int) -> int:
        cands = eligible_views(views)
        best = min(self.key(v) for v in cands)
        return self._rotor.pick([v for v in cands if self.key(v) == best])


class ShortestQueue(_MinBy):
    """Fewest requests (running + waiting, including dispatches not yet reported).

    Good when requests are similar in size; blind to a replica holding a few very long ones.
    """

    name = "shortest_queue"

    @staticmethod
    def key(v: ReplicaView) -> tuple[int, ...]:
        return (v.queue_len,)


class LeastTokens(_MinBy):
    """Fewest outstanding tokens (prompt tokens not yet prefilled + remaining decode budget).

    A better proxy for the work queued on a replica than the request count when sizes vary; the request
    count breaks ties.
    """

    name = "least_tokens"

    @staticmethod
    def key(v: ReplicaView) -> tuple[int, ...]:
        return (v.outstanding_tokens, v.queue_len)


# ============================================================================================ prefix tracking
class PrefixTracker:
    """Remembers, per replica, which page-aligned token prefixes were sent there (bounded, LRU).

    A prompt is cut into pages of ``page_size`` tokens (a trailing partial page is ignored: the replicas'
    prefix caches only share whole KV blocks, so ``page_size`` should equal the engine's block size). Page
    ``k`` is identified by a hash chained over pages ``0..k``, so one hash stands for the whole prefix up to
    and including that page, and a match on page ``k`` means the replica saw that entire prefix.

    Memory is capped at ``max_entries`` (replica, page) pairs in total, evicting the least recently used
    pair across all replicas; an optional per-replica cap (``set_replica_capacity``, e.g. the replica's
    number of KV blocks, since it cannot cache more than that) evicts within a replica. The pages of a
    prompt are touched deepest-first, so its shallow (most shared) pages are the most recent and a
    replica's deep pages are evicted first, as a KV prefix cache would evict leaves before shared roots.

    Hashes are Python's built-in hash of int tuples, which is deterministic (no hash seed for ints). A
    collision can only misroute a request, never corrupt anything, so 64 bits are plenty.
    """

    def __init__(self, page_size: int = 16, max_entries: int = 1 << 17) -> None:
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size: must be a positive int, got {page_size!r}")
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries: must be a positive int, got {max_entries!r}")
        self.page_size = page_size
        self.max_entries = max_entries
        self._by_replica: dict[int, OrderedDict[int, int]] = {}  # replica -> page hash -> last-use tick
        self._index: dict[int, set[int]] = {}  # page hash -> replicas holding it (for matching)
        self._capacity: dict[int, int] = {}  # optional per-replica cap, in pages
        self._size = 0
        self._tick = 0
        self._memo: tuple[tuple[int, ...], list[int]] | None = None  # last prompt hashed (select -> dispatch)

    # ------------------------------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return self._size

    def entries(self, replica_id: int) -> int:
        od = self._by_replica.get(replica_id)
        return len(od) if od else 0

    def page_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """Chained hashes of the full pages of ``token_ids``; memoised for the select/dispatch pair."""
        key = tuple(token_ids)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        p, out, h = self.page_size, [], 0
        for start in range(0, len(key) - p + 1, p):
            h = hash((h, key[start:start + p]))
            out.append(h)
        self._memo = (key, out)
        return out

    def match(self, token_ids: Sequence[int], replica_ids: Iterable[int] | None = None) -> dict[int, int]:
        """Matched prefix length in tokens, per replica (every asked replica is present, 0 if none)."""
        wanted = set(self._by_replica if replica_ids is None else replica_ids)
        result = dict.fromkeys(wanted, 0)
        todo = {r for r in wanted if self._by_replica.get(r)}
        if not todo:
            return result
        hashes = self.page_hashes(token_ids)
        # Deepest page first: the first hit per replica is its longest match.
        for k in range(len(hashes) - 1, -1, -1):
            holders = self._index.get(hashes[k])
            if not holders:
                continue
            for r in holders & todo:
                result[r] = (k + 1) * self.page_size
            todo -= holders
            if not todo:
                break
        return result

    # ------------------------------------------------------------------------------------------ updates
    def insert(self, replica_id: int, token_ids: Sequence[int]) -> None:
        """Record that ``token_ids`` was sent to ``replica_id`` (refreshing pages it already had)."""
        hashes = self.page_hashes(token_ids)
        if not hashes:
            return
        od = self._by_replica.setdefault(replica_id, OrderedDict())
        for h in reversed(hashes):  # shallow pages last = most recently used, evicted last
            self._tick += 1
            if h in od:
                od.move_to_end(h)
            else:
                self._index.setdefault(h, set()).add(replica_id)
                self._size += 1
            od[h] = self._tick
        self._enforce(replica_id)

    def set_replica_capacity(self, replica_id: int, max_pages: int | None) -> None:
        """Cap one replica's entries (None: only the global cap applies)."""
        if max_pages is None or max_pages < 1:
            self._capacity.pop(replica_id, None)
        else:
            self._capacity[replica_id] = max_pages
            self._enforce(replica_id)

    def forget_replica(self, replica_id: int) -> None:
        self._capacity.pop(replica_id, None)
        od = self._by_replica.pop(replica_id, None)
        if not od:
            return
        for h in od:
            self._unindex(h, replica_id)
        self._size -= len(od)

    def clear(self) -> None:
        """Forget everything (e.g. after the replicas' prefix caches were flushed)."""
        self._by_replica.clear()
        self._index.clear()
        self._size = 0

    # ------------------------------------------------------------------------------------------ internals
    def _enforce(self, replica_id: int) -> None:
        od = self._by_replica.get(replica_id)
        cap = self._capacity.get(replica_id)
        while od and cap is not None and len(od) > cap:
            self._evict_from(replica_id)
        while self._size > self.max_entries:
            # Global LRU: the replica whose oldest entry is the oldest of all (a scan over replicas,
            # which are few, instead of a second global ordered structure).
            victim = min((r for r, d in self._by_replica.items() if d),
                         key=lambda r: next(iter(self._by_replica[r].values())))
            self._evict_from(victim)

    def _evict_from(self, replica_id: int) -> None:
        od = self._by_replica[replica_id]
        h, _ = od.popitem(last=False)
        self._unindex(h, replica_id)
        self._size -= 1
        if not od:
            del self._by_replica[replica_id]

    def _unindex(self, h: int, replica_id: int) -> None:
        holders = self._index.get(h)
        if holders is not None:
            holders.discard(replica_id)
            if not holders:
                del self._index[h]


class PrefixAware(_BasePolicy):
    """Send a request where its prompt prefix was sent before, so that replica's prefix cache hits.

    The replica with the longest matched prefix wins if the match is at least ``min_match_tokens`` and the
    replica is not overloaded. "Overloaded" compares outstanding tokens with the least-loaded eligible
    replica: the preferred replica may carry at most

        ``max(imbalance_threshold, imbalance_ratio * least)``

    more outstanding tokens than that one. The absolute term keeps affinity when the system is lightly
    loaded (a few thousand tokens of imbalance cost little); the relative term scales with load, where a
    fixed margin would become noise and affinity would flip back and forth. Otherwise it falls back to
    least_tokens, which also happens when nothing matches. When a hot prefix overflows its replica this
    way, the fallback replica is recorded too, so the prefix then spreads over both.

    Equal matches go to the less loaded replica. Replicas seen dead have their entries dropped, since a
    restarted replica comes back with an empty cache. ``page_size`` should equal the engine's KV block
    size; when a replica reports ``kv_total_tokens`` its entries are capped to what its cache can hold.
    """

    name = "prefix_aware"

    def __init__(self, page_size: int = 16, min_match_tokens: int = 64, imbalance_threshold: int = 4096,
                 imbalance_ratio: float = 0.25, max_entries: int = 1 << 17) -> None:
        if min_match_tokens < 1:
            raise ValueError(f"min_match_tokens: must be >= 1, got {min_match_tokens!r}")
        if imbalance_threshold < 0 or imbalance_ratio < 0:
            raise ValueError("imbalance_threshold and imbalance_ratio must be >= 0, got "
                             f"{imbalance_threshold!r} and {imbalance_ratio!r}")
        self.tracker = PrefixTracker(page_size, max_entries)
        self.min_match_tokens = min_match_tokens
        self.imbalance_threshold = imbalance_threshold
        self.imbalance_ratio = imbalance_ratio
        self._fallback = LeastTokens()

    def __repr__(self) -> str:
        return (f"PrefixAware(page_size={self.tracker.page_size}, min_match_tokens={self.min_match_tokens}, "
                f"imbalance_threshold={self.imbalance_threshold}, imbalance_ratio={self.imbalance_ratio}, "
                f"max_entries={self.tracker.max_entries})")

    def allowed_excess(self, least_outstanding: int) -> float:
        """How many more outstanding tokens than the least-loaded replica a prefix match may carry."""
        return max(self.imbalance_threshold, self.imbalance_ratio * least_outstanding)

    def select(self, views: list[ReplicaView], prompt_ids: list[int], max_new_tokens: int) -> int:
        for v in views:
            if not v.alive and self.tracker.entries(v.replica_id):
                self.tracker.forget_replica(v.replica_id)
        cands = eligible_views(views)
        for v in cands:
            if v.kv_total_tokens > 0:
                self.tracker.set_replica_capacity(v.replica_id, v.kv_total_tokens // self.tracker.page_size)
        matches = self.tracker.match(prompt_ids, [v.replica_id for v in cands])
        best = min(cands, key=lambda v: (-matches[v.replica_id], v.outstanding_tokens, v.replica_id))
        matched = matches[best.replica_id]
        if matched >= self.min_match_tokens:
            least = min(v.outstanding_tokens for v in cands)
            if best.outstanding_tokens - least <= self.allowed_excess(least):
                return best.replica_id
        return self._fallback.select(cands, prompt_ids, max_new_tokens)

    def on_dispatch(self, replica_id: int, prompt_ids: list[int]) -> None:
        self.tracker.insert(replica_id, prompt_ids)

    def forget_replica(self, replica_id: int) -> None:
        self.tracker.forget_replica(replica_id)


# ============================================================================================ registry
POLICIES: dict[str, type] = {
    "round_robin": RoundRobin,
    "shortest_queue": ShortestQueue,
    "least_tokens": LeastTokens,
    "prefix_aware": PrefixAware,
}


def _params(cls: type) -> set[str]:
    init = cls.__init__  # type: ignore[misc]
    return {n for n, p in inspect.signature(init).parameters.items()
            if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def make_policy(name: str, **kwargs: Any) -> Policy:
    """Build the policy named by the ``load_balance`` setting.

    Keyword arguments meant for another policy (e.g. ``page_size`` given to round_robin) are dropped, so a
    caller can pass its settings without knowing which policy is configured; a keyword no policy knows is
    a TypeError, so typos are not silently ignored.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"load_balance: must be one of {list(POLICIES)}, got {name!r}")
    mine = _params(cls)
    known = set().union(*(_params(c) for c in POLICIES.values()))
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"load_balance={name!r}: unknown policy option(s) {unknown}; "
                        f"{name} accepts {sorted(mine) or 'none'}")
    return cls(**{k: v for k, v in kwargs.items() if k in mine})


__all__ = ["POLICIES", "LeastTokens", "NoReplicaAvailable", "Policy", "PrefixAware", "PrefixTracker",
           "ReplicaView", "RoundRobin", "ShortestQueue", "eligible_views", "make_policy"]
