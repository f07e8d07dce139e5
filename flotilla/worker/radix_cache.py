"""A radix tree of KV pages: which blocks hold the KV of which token prefixes.

Each node below the root stands for one full page: its ``key`` is the tuple of ``block_size`` token
ids of that page and its ``block`` is the KV block that holds the page's KV. Because attention is
causal, a page's KV depends on every token before it, so a node is only meaningful together with
its ancestors: the path root -> node spells the whole prefix whose KV the node's block holds.

The tree knows nothing about reference counts; :class:`~flotilla.worker.kv_cache.KVBlockManager`
tells it when a node's block starts or stops being used by a live sequence (:meth:`pin` /
:meth:`unpin`). From that the tree keeps, per node, a *lock* count = (1 if its own block is pinned)
+ (number of locked children). A node with lock 0 has no live user anywhere in its subtree, so the
whole subtree can be dropped leaf by leaf; the tree keeps that count up to date in O(nodes whose
lock changes) so that "how many blocks could eviction give back" is O(1) to answer.

Eviction is LRU over unlocked leaves, through a min-heap of ``(stamp, seq, node)`` with lazy
deletion: an entry is ignored when popped if the node has since been evicted, re-locked, gained a
child, or been touched again (its stamp moved on; the touch pushed a fresh entry). The invariant is
that every unlocked leaf has one heap entry carrying its current stamp, so popping until a valid
entry is found always yields the least recently used evictable leaf. Evicting a leaf may make its
parent an unlocked leaf, which is pushed with its own (older or equal) stamp.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

Page = tuple[int, ...]


class RadixNode:
    """One cached page. ``parent is None`` marks the root (depth 0) or an evicted node (depth > 0)."""

    __slots__ = ("key", "block", "parent", "children", "depth", "lock", "pinned", "stamp")

    def __init__(self, key: Page, block: int, parent: RadixNode | None, depth: int):
        self.key = key
        self.block = block
        self.parent = parent
        self.children: dict[Page, RadixNode] = {}
        self.depth = depth          # number of pages from the root, i.e. this is page index depth-1
        self.lock = 0               # int(pinned) + number of locked children
        self.pinned = False         # the block is referenced by at least one live sequence
        self.stamp = 0              # LRU clock value of the last use

    @property
    def alive(self) -> bool:
        """Still in the tree (the root always is)."""
        return self.parent is not None or self.depth == 0

    def __repr__(self) -> str:
        return f"RadixNode(depth={self.depth}, block={self.block}, lock={self.lock}, stamp={self.stamp})"


class RadixCache:
    """Page-granular prefix tree with lock counts and LRU eviction of unlocked leaves."""

    def __init__(self, block_size: int):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.root = RadixNode((), -1, None, 0)
        self._by_block: dict[int, RadixNode] = {}
        self._heap: list[tuple[int, int, RadixNode]] = []
        self._seq = itertools.count()   # heap tie-break: nodes are not orderable
        self._clock = 0
        self._num_unlocked = 0

    # ------------------------------------------------------------------------------------------ queries
    def __len__(self) -> int:
        """Number of cached pages (nodes below the root)."""
        return len(self._by_block)

    @property
    def num_evictable(self) -> int:
        """Pages that eviction could give back right now, counting parents exposed by evicting children."""
        return self._num_unlocked

    def page_key(self, token_ids: Sequence[int], i: int, space: int = 0) -> Page:
        """The key of page ``i`` of ``token_ids`` (the caller makes sure the page is full). ``space``: the
        prefix-cache space (a LoRA adapter's id; 0 for the base model). The first page of a space other than 0
        leads with ``-space`` (never a token id), so each adapter's prefixes form a subtree of their own and no
        KV is ever shared across adapters; the pages below it follow from their parents."""
        bs = self.block_size
        page = tuple(token_ids[i * bs:(i + 1) * bs])
        return (-space, *page) if space and i == 0 else page

    def node_of(self, block: int) -> RadixNode | None:
        """The node that holds ``block``, if the tree holds it."""
        return self._by_block.get(block)

    def match(self, token_ids: Sequence[int], max_pages: int, space: int = 0) -> list[RadixNode]:
        """The nodes along the longest cached path spelling ``token_ids``, at most ``max_pages`` of them.

        Pure lookup: nothing is pinned or touched, so a caller can decide what to do with the hit.
        """
        node, out = self.root, []
        for i in range(max_pages):
            child = node.children.get(self.page_key(token_ids, i, space))
            if child is None:
                break
            out.append(child)
            node = child
        return out

    # ------------------------------------------------------------------------------------------ updates
    def tick(self) -> int:
        """Advance the LRU clock; every node touched until the next tick shares this stamp."""
        self._clock += 1
        return self._clock

    def touch(self, node: RadixNode) -> None:
        """Mark ``node`` as used now. An evictable leaf gets a fresh heap entry (the old one goes stale)."""
        if node.stamp == self._clock:
            return
        node.stamp = self._clock
        if node.lock == 0 and not node.children:
            self._push(node)

    def insert(self, parent: RadixNode, key: Page, block: int, pinned: bool) -> RadixNode:
        """Add a child page under ``parent``; the caller has checked that neither key nor block is taken."""
        spaced = parent is self.root and len(key) == self.block_size + 1 and key[0] < 0
        if len(key) != self.block_size and not spaced:
            raise ValueError(f"a page holds {self.block_size} tokens, got {len(key)}")
        if key in parent.children or block in self._by_block or not parent.alive:
            raise ValueError(f"cannot insert block {block}: page or block already cached, or parent evicted")
        node = RadixNode(key, block, parent, parent.depth + 1)
        node.stamp = self._clock
        parent.children[key] = node
        self._by_block[block] = node
        self._num_unlocked += 1
        if pinned:
            self.pin(node)
        else:
            self._push(node)
        return node

    def pin(self, node: RadixNode) -> None:
        """``node``'s block went from unused to used by a live sequence: lock it and its ancestors."""
        if node.pinned:
            raise ValueError(f"{node} is already pinned")
        node.pinned = True
        while node is not self.root:
            node.lock += 1
            if node.lock > 1:       # was already locked: ancestors already count it
                return
            self._num_unlocked -= 1
            node = node.parent  # type: ignore[assignment]

    def unpin(self, node: RadixNode) -> None:
        """``node``'s block is no longer used by any live sequence: unlock as far up as that reaches."""
        if not node.pinned:
            raise ValueError(f"{node} is not pinned")
        node.pinned = False
        while node is not self.root:
            node.lock -= 1
            if node.lock > 0:
                return
            self._num_unlocked += 1
            if not node.children:
                self._push(node)
            node = node.parent  # type: ignore[assignment]

    def evict_lru(self) -> int | None:
        """Drop the least recently used unlocked leaf and return its block, or None if there is none."""
        heap = self._heap
        while heap:
            stamp, _, node = heapq.heappop(heap)
            if node.parent is None or node.lock or node.children or stamp != node.stamp:
                continue            # stale entry
            self._remove(node)
            return node.block
        return None

    def _remove(self, node: RadixNode) -> None:
        parent = node.parent
        assert parent is not None and node.lock == 0 and not node.children
        del parent.children[node.key]
        del self._by_block[node.block]
        self._num_unlocked -= 1
        node.parent = None
        if parent is not self.root and parent.lock == 0 and not parent.children:
            self._push(parent)

    def _push(self, node: RadixNode) -> None:
        heapq.heappush(self._heap, (node.stamp, next(self._seq), node))
        if len(self._heap) > 2 * len(self._by_block) + 64:
            self._compact()

    def _compact(self) -> None:
        """Drop stale heap entries so the heap stays O(cached pages) however many touches happen."""
        seen: set[int] = set()
        kept = []
        for entry in self._heap:
            stamp, _, node = entry
            if node.parent is None or node.lock or node.children or stamp != node.stamp or id(node) in seen:
                continue
            seen.add(id(node))
            kept.append(entry)
        heapq.heapify(kept)
        self._heap = kept

    # ------------------------------------------------------------------------------------------ checks
    def check(self) -> dict[int, RadixNode]:
        """Assert the tree's structure, lock counts and heap coverage; return block -> node for every node."""
        found: dict[int, RadixNode] = {}
        unlocked = 0
        stack = [self.root]
        unlocked_leaves: list[RadixNode] = []
        # Post-order via explicit stack so deep trees do not hit the recursion limit.
        order: list[RadixNode] = []
        while stack:
            node = stack.pop()
            order.append(node)
            for key, child in node.children.items():
                assert child.parent is node, f"{child} has a wrong parent"
                assert child.key == key and (len(key) == self.block_size or (
                    node is self.root and len(key) == self.block_size + 1 and key[0] < 0)), f"{child} has a bad key"
                assert child.depth == node.depth + 1, f"{child} has a bad depth"
                assert child.block not in found, f"block {child.block} is in two nodes"
                found[child.block] = child
                stack.append(child)
        for node in reversed(order):
            if node is self.root:
                continue
            expect = int(node.pinned) + sum(1 for c in node.children.values() if c.lock > 0)
            assert node.lock == expect, f"{node}: lock {node.lock} != {expect}"
            if node.lock == 0:
                unlocked += 1
                if not node.children:
                    unlocked_leaves.append(node)
        assert found.keys() == self._by_block.keys(), "block index out of sync with the tree"
        assert all(self._by_block[b] is n for b, n in found.items()), "block index points at the wrong node"
        assert unlocked == self._num_unlocked, f"unlocked count {self._num_unlocked} != {unlocked}"
        live = {(id(n), s) for s, _, n in self._heap}
        for leaf in unlocked_leaves:
            assert (id(leaf), leaf.stamp) in live, f"evictable leaf {leaf} missing from the LRU heap"
        return found
