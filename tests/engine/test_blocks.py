"""The block manager alone: allocation, freeing, prefix-cache hashing and reference counts."""

import pytest

from lmforge.engine.blocks import BlockManager, block_hash


def test_allocate_and_free_count_blocks():
    bm = BlockManager(4, 2)
    table: list[int] = []
    assert bm.grow(table, 3)  # 3 tokens -> 2 blocks
    assert len(table) == 2 and bm.num_used == 2 and bm.num_free == 2
    assert bm.grow(table, 4) and len(table) == 2  # still fits
    assert not bm.grow(table, 9)  # needs 3 more blocks, only 2 free: nothing changes
    assert len(table) == 2 and bm.num_free == 2
    bm.free(table)
    assert table == [] and bm.num_used == 0 and bm.num_free == 4


def test_double_free_and_exhaustion_raise():
    bm = BlockManager(1, 4)
    b = bm.allocate()
    with pytest.raises(RuntimeError, match="no free KV block"):
        bm.allocate()
    bm.release(b)
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.release(b)


def test_hash_names_the_whole_prefix():
    a = block_hash(None, [1, 2])
    assert a == block_hash(None, [1, 2])
    assert a != block_hash(None, [2, 1])
    assert block_hash(a, [3, 4]) != block_hash(block_hash(None, [9, 9]), [3, 4])  # same block, other prefix


def test_prefix_cache_shares_full_blocks_with_refcounts():
    bm = BlockManager(8, 2)
    tokens = [1, 2, 3, 4, 5]
    table, hashes = [], []
    assert bm.grow(table, 5)
    bm.publish_full_blocks(tokens, table, hashes, 5)  # blocks [1,2] and [3,4] are full; [5] is not
    assert len(hashes) == 2
    hit, hit_hashes = bm.match_prefix([1, 2, 3, 4, 9, 9])
    assert hit == table[:2] and hit_hashes == hashes
    assert [bm.ref_count[b] for b in hit] == [2, 2]
    assert bm.prefix_hits == 4
    # a different second block matches only the first
    hit2, _ = bm.match_prefix([1, 2, 7, 7, 9])
    assert hit2 == table[:1] and bm.ref_count[table[0]] == 3
    bm.free(hit2)
    bm.free(hit)
    assert [bm.ref_count[b] for b in table] == [1, 1, 1]


def test_last_token_is_never_matched():
    bm = BlockManager(4, 2)
    tokens = [1, 2, 3, 4]
    table, hashes = [], []
    bm.grow(table, 4)
    bm.publish_full_blocks(tokens, table, hashes, 4)
    hit, _ = bm.match_prefix(tokens)  # the same 4 tokens: the 2nd block holds the last token
    assert hit == table[:1]


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(3, 2)
    tokens = [1, 2, 3, 4, 5]
    table, hashes = [], []
    bm.grow(table, 5)
    bm.publish_full_blocks(tokens, table, hashes, 4)
    first, second, third = table
    bm.free(table)
    assert bm.num_free == 3 and bm.num_used == 0  # cached blocks count as free
    # eviction order: the tail of a freed sequence goes first
    assert list(bm.free_queue) == [third, second, first]
    hit, _ = bm.match_prefix(tokens)
    assert hit == [first, second] and bm.num_free == 1  # taken back out of the free queue
    bm.free(hit)
    # handing a cached block out again evicts its hash
    fresh = [bm.allocate() for _ in range(3)]
    assert sorted(fresh) == sorted([first, second, third])
    assert bm.cached == {} and all(h is None for h in bm.hash_of)
    bm.free(fresh)
    assert bm.match_prefix(tokens) == ([], [])


def test_duplicate_blocks_are_published_once():
    bm = BlockManager(4, 2)
    t1, h1, t2, h2 = [], [], [], []
    bm.grow(t1, 2)
    bm.grow(t2, 2)
    bm.publish_full_blocks([5, 6], t1, h1, 2)
    bm.publish_full_blocks([5, 6], t2, h2, 2)  # same content computed twice (admitted in one step)
    assert h1 == h2 and bm.cached[h1[0]] == t1[0] and bm.hash_of[t2[0]] is None
    bm.free(t2)
    bm.free(t1)
    assert bm.num_free == 4


def test_prefix_caching_off():
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    table, hashes = [], []
    bm.grow(table, 4)
    bm.publish_full_blocks([1, 2, 3, 4], table, hashes, 4)
    assert bm.cached == {}
    assert bm.match_prefix([1, 2, 3, 4, 5]) == ([], [])
