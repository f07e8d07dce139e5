"""KVBlockManager + RadixCache: accounting, prefix matching, sharing, LRU eviction, and a randomized stress run."""

from __future__ import annotations

import random

import pytest

from flotilla.worker.kv_cache import KVBlockManager
from flotilla.worker.radix_cache import RadixCache

BS = 4


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def compute(kv: KVBlockManager, tokens: list[int]) -> list[int]:
    """Admit a sequence the way the scheduler does: match, allocate the rest, cache its full pages."""
    blocks, cached = kv.match_prefix(tokens)
    need = -(-len(tokens) // kv.block_size) - len(blocks)
    more = kv.allocate(need)
    assert more is not None
    blocks += more
    kv.cache_pages(tokens, blocks)
    kv.check_invariants()
    return blocks


# ---------------------------------------------------------------------------------------------- accounting
def test_allocate_release_accounting():
    kv = KVBlockManager(8, BS)
    assert kv.num_free_blocks() == 8 and kv.usage() == 0.0 and kv.cached_tokens() == 0
    a = kv.allocate(3)
    assert a is not None and len(set(a)) == 3 and all(0 <= b < 8 for b in a)
    assert all(kv.refcount(b) == 1 for b in a)
    assert kv.num_free_blocks() == 5 and kv.usage() == pytest.approx(3 / 8)
    b = kv.allocate(5)
    assert b is not None and not set(a) & set(b)
    assert kv.num_free_blocks() == 0 and kv.usage() == 1.0
    assert kv.allocate(1) is None
    assert kv.allocate(0) == []
    kv.check_invariants()
    kv.release(a)
    assert kv.num_free_blocks() == 3 and kv.usage() == pytest.approx(5 / 8)
    kv.release(b)
    assert kv.num_free_blocks() == 8 and kv.usage() == 0.0
    kv.check_invariants()


def test_over_release_raises_without_side_effects():
    kv = KVBlockManager(4, BS)
    a = kv.allocate(2)
    kv.release(a)
    with pytest.raises(ValueError):
        kv.release(a)
    c = kv.allocate(1)
    with pytest.raises(ValueError):
        kv.release(c + c)
    assert kv.refcount(c[0]) == 1
    kv.check_invariants()


# ---------------------------------------------------------------------------------------------- matching
def test_match_after_cache_pages():
    kv = KVBlockManager(16, BS)
    t = toks(10)  # two full pages + 2 tokens
    blocks = compute(kv, t)
    assert kv.cached_tokens() == 8  # partial page not cached
    kv.release(blocks)
    kv.check_invariants()
    assert kv.usage() == 0.0
    assert kv.num_free_blocks() == 16  # cached pages are evictable

    m, n = kv.match_prefix(t + [99, 98])
    assert m == blocks[:2] and n == 8
    assert all(kv.refcount(b) == 1 for b in m)
    assert kv.usage() == pytest.approx(2 / 16)
    kv.check_invariants()
    kv.release(m)
    # Diverging second page: only the first page matches.
    m, n = kv.match_prefix(toks(4) + [50, 51, 52, 53, 54])
    assert m == blocks[:1] and n == 4
    kv.release(m)
    # Nothing in common.
    assert kv.match_prefix(toks(9, start=100)) == ([], 0)
    kv.check_invariants()


def test_never_the_whole_sequence():
    kv = KVBlockManager(16, BS)
    t = toks(12)  # exactly three pages
    blocks = compute(kv, t)
    kv.release(blocks)
    m, n = kv.match_prefix(t)
    assert len(m) == 2 and n == 8  # at least one token is left to compute
    kv.release(m)
    m, n = kv.match_prefix(t[:8])
    assert len(m) == 1 and n == 4
    kv.release(m)
    assert kv.match_prefix(t[:4]) == ([], 0)
    assert kv.match_prefix(t[:1]) == ([], 0)
    assert kv.match_prefix([]) == ([], 0)
    m, n = kv.match_prefix(t + [7])
    assert m == blocks and n == 12
    kv.release(m)
    kv.check_invariants()


def test_shared_prefix_between_two_sequences():
    kv = KVBlockManager(16, BS)
    system = toks(8)
    a_tokens = system + [100, 101, 102, 103, 104]
    a = compute(kv, a_tokens)
    b_tokens = system + [200, 201, 202]
    b = compute(kv, b_tokens)
    assert b[:2] == a[:2] and b[2] != a[2]
    assert kv.refcount(a[0]) == 2 and kv.refcount(a[1]) == 2
    assert kv.usage() == pytest.approx(5 / 16)  # 2 shared + 2 of a's own + 1 of b's own
    kv.release(a)
    assert kv.refcount(a[0]) == 1
    # a's own full page (third) is cached, unreferenced; a's partial page went back to the free list.
    assert kv.num_free_blocks() == 16 - 3
    kv.check_invariants()
    kv.release(b)
    assert kv.num_free_blocks() == 16 and kv.usage() == 0.0
    assert kv.cached_tokens() == 12
    kv.check_invariants()


def test_concurrent_duplicate_pages_keep_first_copy():
    kv = KVBlockManager(16, BS)
    t = toks(9)
    a = kv.allocate(3)
    b = kv.allocate(3)
    kv.cache_pages(t, a)
    kv.cache_pages(t, b)  # same pages, other blocks: tree keeps a's
    kv.check_invariants()
    assert kv.cached_tokens() == 8
    m, _ = kv.match_prefix(t)
    assert m == a[:2]
    kv.release(m)
    # b keeps growing on its own blocks; its new page hangs under a's path.
    t2 = t + toks(3, start=500)
    kv.cache_pages(t2, b)
    assert kv.cached_tokens() == 12
    kv.release(a)
    kv.check_invariants()
    m, n = kv.match_prefix(t2 + [1])
    assert m == a[:2] + [b[2]] and n == 12
    kv.release(m)
    kv.release(b)
    kv.check_invariants()
    assert kv.num_free_blocks() == 16


def test_cache_pages_is_idempotent_and_incremental(monkeypatch):
    kv = KVBlockManager(300, BS)
    t = toks(4 * 200 + 1)
    blocks = kv.allocate(201)
    kv.cache_pages(t, blocks)
    assert kv.cached_tokens() == 800
    calls = 0
    real = RadixCache.page_key

    def counting(self, token_ids, i, space=0):
        nonlocal calls
        calls += 1
        return real(self, token_ids, i, space)

    monkeypatch.setattr(RadixCache, "page_key", counting)
    kv.cache_pages(t, blocks)  # nothing new
    assert calls <= 2
    kv.cache_pages(t[:-1], blocks)  # shorter: still nothing to do
    assert calls <= 4
    t += [7, 7, 7]  # the 201st page is now full
    calls = 0
    kv.cache_pages(t, blocks)
    assert kv.cached_tokens() == 804 and calls <= 4
    kv.check_invariants()


def test_alias_of_evicted_node_is_replaced_by_own_block():
    kv = KVBlockManager(8, BS)
    t = toks(9)
    a = compute(kv, t)
    b = kv.allocate(3)                # admitted before a's pages were cached: computes them itself
    kv.release(a)
    kv.cache_pages(t, b)              # tree keeps a's copies; b's are aliases
    assert kv.cached_tokens() == 8
    assert kv.allocate(3) is not None  # free blocks first (a's partial page + 2 never used), ...
    assert kv.allocate(2) == [a[1], a[0]]  # ... then a's unreferenced cached pages, leaf first
    assert kv.cached_tokens() == 0
    kv.cache_pages(t + [1, 2, 3], b)  # b's own copies now enter the tree
    assert kv.cached_tokens() == 12
    kv.check_invariants()
    m, n = kv.match_prefix(t + [1, 2, 3, 4])
    assert m == b and n == 12
    kv.check_invariants()


def test_lru_heap_stays_bounded_under_repeated_touches():
    kv = KVBlockManager(8, BS)
    t = toks(9)
    kv.release(compute(kv, t))
    for _ in range(500):
        m, _ = kv.match_prefix(t)
        kv.release(m)
    assert len(kv._tree._heap) <= 2 * len(kv._tree) + 65
    kv.check_invariants()
    assert kv.reset_prefix_cache() is True
    kv.check_invariants()


def test_deep_chain():
    kv = KVBlockManager(5000, 1)
    t = [i % 7 for i in range(4000)]
    blocks = kv.allocate(4000)
    for end in range(1, 4001, 37):  # grows the way the scheduler calls it, step by step
        kv.cache_pages(t[:end], blocks)
    kv.cache_pages(t, blocks)
    assert kv.cached_tokens() == 4000
    kv.check_invariants()
    kv.release(blocks)
    m, n = kv.match_prefix(t + [0])
    assert m == blocks and n == 4000
    kv.release(m)
    assert kv.allocate(5000) is not None and kv.cached_tokens() == 0
    kv.check_invariants()


# ---------------------------------------------------------------------------------------------- eviction
def test_lru_eviction_order():
    kv = KVBlockManager(6, BS)
    old = compute(kv, toks(8, start=0))       # two pages, will be released first
    new = compute(kv, toks(8, start=100))     # two pages, released later
    kept = compute(kv, toks(8, start=200))    # still referenced
    kv.release(old)
    kv.release(new)
    assert kv.num_free_blocks() == 4
    # Leaf first, and older first: old's second page, then old's first page.
    x = kv.allocate(1)
    assert x == [old[1]]
    m, _ = kv.match_prefix(toks(8, start=0) + [1])
    assert m == [old[0]]
    kv.release(m)  # touching old's first page makes it the most recently used
    y = kv.allocate(1)
    assert y == [new[1]]
    z = kv.allocate(2)
    assert set(z) == {new[0], old[0]} and z[0] == new[0]
    assert kv.allocate(1) is None  # only referenced blocks are left
    assert all(kv.refcount(b) == 1 for b in kept)
    kv.check_invariants()
    m, n = kv.match_prefix(toks(8, start=200) + [1])
    assert m == kept and n == 8
    kv.release(m)
    assert kv.match_prefix(toks(8, start=0) + [1]) == ([], 0)
    kv.check_invariants()


def test_recency_counts_from_release():
    """A page is in use until its sequence lets go, so a long-running sequence's pages are the fresh ones."""
    kv = KVBlockManager(4, BS)
    long_running = compute(kv, toks(8, start=0))
    short = compute(kv, toks(8, start=100))
    kv.release(short)
    kv.release(long_running)
    assert kv.allocate(2) == [short[1], short[0]]
    assert kv.cached_tokens() == 8
    kv.check_invariants()


def test_cache_pages_ignores_blocks_it_does_not_hold():
    kv = KVBlockManager(8, BS)
    t = toks(9)
    blocks = kv.allocate(3)
    kv.release(blocks)
    kv.cache_pages(t, blocks)  # misuse: the blocks are free again; they must not enter the tree
    assert kv.cached_tokens() == 0
    kv.check_invariants()


def test_free_blocks_used_before_cache_and_parent_exposed_after_child():
    kv = KVBlockManager(5, BS)
    seq = compute(kv, toks(8))
    kv.release(seq)
    a = kv.allocate(3)
    assert not set(a) & set(seq) and kv.cached_tokens() == 8
    b = kv.allocate(2)
    assert b == [seq[1], seq[0]]
    assert kv.cached_tokens() == 0
    kv.check_invariants()


def test_unreferenced_parent_of_referenced_child_is_not_evictable():
    kv = KVBlockManager(6, BS)
    t = toks(9)
    a = kv.allocate(3)
    b = kv.allocate(3)
    kv.cache_pages(t, a)
    kv.cache_pages(t, b)  # b computed the same two pages: it aliases a's nodes, adds nothing
    assert kv.cached_tokens() == 8
    kv.cache_pages(t[:8] + toks(4, start=50), b)  # b's third page (diverging) hangs under a's second node
    assert kv.cached_tokens() == 12
    kv.release(a)  # a's nodes are unreferenced but locked by b's child
    kv.check_invariants()
    assert kv.num_free_blocks() == 1  # only a's partial-page block
    assert kv.allocate(2) is None
    assert kv.allocate(1) == [a[2]]
    kv.release(b)
    assert kv.num_free_blocks() == 3 + 2  # b's two private copies freed + three cached pages
    kv.check_invariants()


def test_allocate_none_has_no_side_effects():
    kv = KVBlockManager(4, BS)
    s = compute(kv, toks(8))
    kv.release(s)
    held = kv.allocate(1)
    before = (kv.num_free_blocks(), kv.usage(), kv.cached_tokens())
    assert kv.allocate(4) is None
    assert (kv.num_free_blocks(), kv.usage(), kv.cached_tokens()) == before
    m, n = kv.match_prefix(toks(9))
    assert m == s and n == 8
    kv.release(m + held)
    kv.check_invariants()


# ---------------------------------------------------------------------------------------------- modes
def test_disabled_cache():
    kv = KVBlockManager(8, BS, enable_prefix_cache=False)
    t = toks(13)
    blocks = kv.allocate(4)
    kv.cache_pages(t, blocks)
    assert kv.cached_tokens() == 0
    assert kv.match_prefix(t) == ([], 0)
    kv.release(blocks)
    assert kv.num_free_blocks() == 8
    kv.check_invariants()


def test_reset_prefix_cache():
    kv = KVBlockManager(16, BS)
    a = compute(kv, toks(9))
    b = compute(kv, toks(9, start=100))
    kv.release(a)
    assert kv.cached_tokens() == 16
    assert kv.reset_prefix_cache() is False  # b's pages are still in use
    assert kv.cached_tokens() == 8
    assert kv.match_prefix(toks(9)) == ([], 0)
    kv.check_invariants()
    kv.release(b)
    assert kv.reset_prefix_cache() is True
    assert kv.cached_tokens() == 0 and kv.num_free_blocks() == 16
    assert kv.match_prefix(toks(9, start=100)) == ([], 0)
    kv.check_invariants()
    assert kv.reset_prefix_cache() is True


def test_bad_arguments():
    with pytest.raises(ValueError):
        KVBlockManager(0, BS)
    with pytest.raises(ValueError):
        KVBlockManager(4, 0)
    with pytest.raises(ValueError):
        KVBlockManager(4, BS).allocate(-1)


# ---------------------------------------------------------------------------------------------- stress
class _Seq:
    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.blocks: list[int] = []
        self.computed = 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_randomized_stress(seed: int, block_size: int):
    rng = random.Random(seed * 100 + block_size)
    num_blocks = rng.choice([8, 24, 64])
    kv = KVBlockManager(num_blocks, block_size)
    # shadow[b]: the token prefix whose KV block b holds, through the last position written into it.
    shadow: dict[int, tuple[int, ...]] = {}
    bases = [[rng.randrange(5) for _ in range(rng.randrange(0, 4 * block_size + 3))] for _ in range(4)]
    live: list[_Seq] = []
    vocab = 6  # small vocabulary: lots of accidental sharing and duplicate pages

    def verify_match(tokens: list[int], blocks: list[int], n: int) -> None:
        assert n == len(blocks) * block_size
        assert len(blocks) <= max(0, (len(tokens) - 1) // block_size)
        for p, b in enumerate(blocks):
            assert shadow.get(b) == tuple(tokens[:(p + 1) * block_size]), f"block {b} does not hold page {p}"

    def grow(seq: _Seq, n_tokens: int) -> bool:
        need = -(-n_tokens // block_size) - len(seq.blocks)
        if need <= 0:
            return True
        got = kv.allocate(need)
        if got is None:
            return False
        for b in got:
            assert kv.refcount(b) == 1
            shadow.pop(b, None)  # fresh block: garbage until written
        seq.blocks += got
        return True

    def compute_tokens(seq: _Seq, k: int) -> None:
        end = seq.computed + k
        for pos in range(seq.computed, end):
            b = seq.blocks[pos // block_size]
            assert kv.refcount(b) == 1, "writing into a shared block"
            shadow[b] = tuple(seq.tokens[:pos + 1])
        seq.computed = end

    def finish(seq: _Seq, publish: bool) -> None:
        if publish:
            kv.cache_pages(seq.tokens[:seq.computed], seq.blocks)
        kv.release(seq.blocks)
        live.remove(seq)

    for _ in range(600):
        op = rng.random()
        if op < 0.25 or not live:
            base = rng.choice(bases)
            tokens = base + [rng.randrange(vocab) for _ in range(rng.randrange(1, 3 * block_size + 2))]
            seq = _Seq(tokens)
            blocks, n = kv.match_prefix(tokens)
            verify_match(tokens, blocks, n)
            seq.blocks, seq.computed = blocks, n
            live.append(seq)
        elif op < 0.65:
            seq = rng.choice(live)
            if seq.computed == len(seq.tokens):
                seq.tokens.append(rng.randrange(vocab))  # a generated token
            k = rng.randint(1, len(seq.tokens) - seq.computed)
            if grow(seq, seq.computed + k):
                compute_tokens(seq, k)
                kv.cache_pages(seq.tokens[:seq.computed], seq.blocks)
            else:
                finish(seq, publish=rng.random() < 0.7)  # preempted (or aborted)
        elif op < 0.75:
            seq = rng.choice(live)
            kv.cache_pages(seq.tokens[:seq.computed], seq.blocks)  # idempotent repeat
        elif op < 0.88:
            finish(rng.choice(live), publish=rng.random() < 0.8)
        elif op < 0.95:
            probe = rng.choice(bases) + [rng.randrange(vocab) for _ in range(rng.randrange(0, 2 * block_size))]
            blocks, n = kv.match_prefix(probe)
            verify_match(probe, blocks, n)
            kv.release(blocks)
        elif op < 0.98:
            before = kv.num_free_blocks()
            n = rng.randint(0, num_blocks)
            got = kv.allocate(n)
            if got is None:
                assert n > before and kv.num_free_blocks() == before
            else:
                for b in got:
                    shadow.pop(b, None)
                kv.release(got)
        else:
            empty = kv.reset_prefix_cache()
            assert empty == (kv.cached_tokens() == 0)
        kv.check_invariants()
        held = sum(1 for b in range(num_blocks) if kv.refcount(b) > 0)
        assert kv.usage() == pytest.approx(held / num_blocks)
        assert kv.num_free_blocks() <= num_blocks - held

    for seq in list(live):
        finish(seq, publish=True)
        kv.check_invariants()
    assert kv.usage() == 0.0 and kv.num_free_blocks() == num_blocks
    assert kv.reset_prefix_cache() is True
    kv.check_invariants()
