"""Paged-KV block bookkeeping: a free list, per-block reference counts and the radix prefix cache.

Every block id ``0..num_blocks-1`` is, at any time, exactly one of

* **free**: on the free list, holding nothing anyone wants;
* **referenced**: used by one or more live sequences (refcount > 0); it may also sit in the prefix
  tree, which is how sequences with a common prefix share pages;
* **cached**: refcount 0 but kept in the prefix tree so a later request with the same prefix can
  skip recomputing it. Cached blocks are handed out again (LRU, leaves first) only when the free
  list runs dry, so the cache costs nothing but is used as much as memory allows.

The scheduler only ever sees :class:`KVBlockManager`; the tree itself is in
:mod:`flotilla.worker.radix_cache`.

Duplicate pages. Two sequences that compute the same prefix at the same time (neither could hit the
cache at admission) end up with two blocks holding identical KV. The tree keeps the first one;
the second sequence keeps using its own copy, and the manager records that copy as an *alias* of
the tree node (block -> node). Aliases are what let :meth:`KVBlockManager.cache_pages` stay
O(new pages): the scheduler calls it every step with the sequence's whole token list, and the
manager finds where the sequence's already-inserted pages end by looking its blocks up (from the
last full page backwards) instead of walking the tree from the root.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from flotilla.worker.radix_cache import RadixCache, RadixNode


class KVBlockManager:
    """Allocator + refcounts + prefix cache for one replica's KV pool (pure bookkeeping, no tensors)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self._ref = [0] * num_blocks
        # pop() takes from the end: listing ids high to low hands out low ids first (easier to read in logs).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._num_referenced = 0
        self._tree = RadixCache(block_size)
        self._alias: dict[int, RadixNode] = {}   # a sequence's own copy of a page the tree holds in another block

    # ------------------------------------------------------------------------------------------ queries
    def num_free_blocks(self) -> int:
        """Blocks :meth:`allocate` could hand out now: free ones plus cached ones no live sequence needs."""
        return len(self._free) + self._tree.num_evictable

    def usage(self) -> float:
        """Fraction of the pool that live sequences hold (the cache counts as free: it yields on demand)."""
        return self._num_referenced / self.num_blocks

    def cached_tokens(self) -> int:
        """Tokens whose KV the prefix tree holds (referenced or not)."""
        return len(self._tree) * self.block_size

    def refcount(self, block: int) -> int:
        """How many live sequences use ``block`` (for tests and debugging)."""
        return self._ref[block]

    # ------------------------------------------------------------------------------------------ sequences
    def match_prefix(self, token_ids: Sequence[int], space: int = 0) -> tuple[list[int], int]:
        """Reuse the longest cached run of full pages that starts ``token_ids``.

        At most ``(len(token_ids) - 1) // block_size`` pages are returned, so at least one token is
        left to compute (the model must run on something to produce the next token's logits). The
        returned blocks become the sequence's first blocks: their refcounts go up, which also keeps
        them (and their ancestors) from being evicted while the sequence lives. ``space``: the prefix-cache
        space (a LoRA adapter's id, 0 for the base model): only pages cached in the same space match.
        """
        if not self.enable_prefix_cache:
            return [], 0
        max_pages = (len(token_ids) - 1) // self.block_size
        if max_pages <= 0:
            return [], 0
        nodes = self._tree.match(token_ids, max_pages, space)
        if not nodes:
            return [], 0
        self._tree.tick()
        blocks = []
        for node in nodes:
            b = node.block
            if self._ref[b] == 0:
                self._num_referenced += 1
                self._tree.pin(node)
            self._ref[b] += 1
            self._tree.touch(node)
            blocks.append(b)
        return blocks, len(blocks) * self.block_size

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks at refcount 1, or None with nothing changed when the pool cannot supply them.

        Truly free blocks go first; only then are cached pages evicted, least recently used leaf first,
        so the cache keeps as much as memory allows.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n == 0:
            return []
        if n > self.num_free_blocks():
            return None
        take = min(n, len(self._free))
        out = self._free[len(self._free) - take:]
        out.reverse()
        del self._free[len(self._free) - take:]
        while len(out) < n:
            b = self._tree.evict_lru()
            assert b is not None, "evictable count out of sync with the tree"
            out.append(b)
        for b in out:
            self._ref[b] = 1
        self._num_referenced += n
        return out

    def cache_pages(self, token_ids: Sequence[int], blocks: Sequence[int], space: int = 0) -> None:
        """Publish the sequence's computed full pages (``blocks[i]`` holds ``token_ids[i*bs:(i+1)*bs]``).

        Idempotent and O(new pages): the last full page is looked up by its block first, and when it is
        already placed (in the tree, or as an alias of the tree's copy) nothing else happens. Otherwise
        the scan goes back to the deepest placed page and inserts from there. Where the tree already has
        the page in another block, that node is kept and this sequence's block is remembered as an alias
        (so the next call is O(1) again); the sequence keeps computing into its own blocks either way.
        The partial last page is never cached: its KV is still being written.
        """
        if not self.enable_prefix_cache:
            return
        n = min(len(token_ids) // self.block_size, len(blocks))
        if n <= 0:
            return
        i = n - 1
        parent: RadixNode | None = None
        while i >= 0:
            parent = self._placed(blocks[i], i, token_ids, space)
            if parent is not None:
                break
            i -= 1
        if i == n - 1:
            return
        if parent is None:
            parent = self._tree.root
        tree = self._tree
        tree.tick()
        for j in range(i + 1, n):
            key = tree.page_key(token_ids, j, space)
            b = blocks[j]
            child = parent.children.get(key)
            if child is None:
                # Only a block this sequence holds may enter the tree (a released one could be reused
                # under us), and a block can stand for one page only.
                if self._ref[b] <= 0 or tree.node_of(b) is not None:
                    return
                self._alias.pop(b, None)
                child = tree.insert(parent, key, b, pinned=True)
            elif child.block != b:
                if tree.node_of(b) is None and self._ref[b] > 0:
                    self._alias[b] = child
                tree.touch(child)
            parent = child

    def _placed(self, block: int, page: int, token_ids: Sequence[int], space: int = 0) -> RadixNode | None:
        """The live tree node standing for page ``page`` of ``token_ids`` that ``block`` is known to hold.

        Depth and key are checked (O(block_size)) so a stale or misused hint can only cost a longer walk,
        never a wrong insertion.
        """
        node = self._tree.node_of(block) or self._alias.get(block)
        if node is None or not node.alive or node.depth != page + 1:
            return None
        if node.key != self._tree.page_key(token_ids, page, space):
            return None
        return node

    def release(self, blocks: Sequence[int]) -> None:
        """The sequence is done with ``blocks`` (finished, aborted or preempted).

        Blocks nobody references any more stay in the tree as evictable cache (touched now, since this
        is their last use) or else return to the free list. Over-releasing raises before changing anything.
        """
        if not blocks:
            return
        for b, k in Counter(blocks).items():
            if not 0 <= b < self.num_blocks or self._ref[b] < k:
                raise ValueError(f"block {b} released more often than it is referenced")
        tree = self._tree
        tree.tick()
        for b in blocks:
            node = tree.node_of(b)
            if node is not None:
                tree.touch(node)    # before unpin, so an evictable leaf is queued once, with the new stamp
            self._ref[b] -= 1
            if self._ref[b]:
                continue
            self._num_referenced -= 1
            if node is not None:
                tree.unpin(node)
            else:
                self._alias.pop(b, None)
                self._free.append(b)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached page no live sequence uses (e.g. after a weight update made them stale).

        Pages still referenced, and their ancestors, stay: dropping them would orphan running sequences'
        pages. Returns True when the tree is empty afterwards, i.e. nothing stale can be matched any more.
        """
        tree = self._tree
        while (b := tree.evict_lru()) is not None:
            self._free.append(b)
        return len(tree) == 0

    # ------------------------------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Assert that every block is exactly one of free / referenced / cached-unreferenced, and more.

        O(num_blocks + tree size): for tests, not for the serving loop.
        """
        nb = self.num_blocks
        assert len(self._ref) == nb
        assert all(r >= 0 for r in self._ref), "negative refcount"
        free = set(self._free)
        assert len(free) == len(self._free), "duplicate block on the free list"
        assert all(0 <= b < nb for b in free), "free list holds an out-of-range id"
        in_tree = self._tree.check()
        assert all(0 <= b < nb for b in in_tree), "tree holds an out-of-range id"
        if not self.enable_prefix_cache:
            assert not in_tree and not self._alias, "prefix cache disabled but pages are cached"
        referenced = 0
        for b in range(nb):
            r = self._ref[b]
            node = in_tree.get(b)
            kinds = (b in free) + (r > 0) + (node is not None and r == 0)
            assert kinds == 1, f"block {b}: free={b in free} ref={r} cached={node is not None}"
            if node is not None:
                assert node.pinned == (r > 0), f"block {b}: pinned={node.pinned} but refcount {r}"
            referenced += r > 0
        assert referenced == self._num_referenced, f"referenced count {self._num_referenced} != {referenced}"
        for b in self._alias:
            assert self._ref[b] > 0 and b not in in_tree, f"alias {b} is not a live private copy"
        assert self.num_free_blocks() == len(free) + sum(1 for n in in_tree.values() if n.lock == 0)
