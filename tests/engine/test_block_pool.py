"""KV block pool: free list, reference counts, hash-chained prefix cache with LRU eviction."""

from __future__ import annotations

import pytest

from telechat.engine.block_pool import BlockPool, block_hashes, hash_block

BS = 4


def cached_chain(pool: BlockPool, tokens: list[int], salt: tuple = ()) -> list[int]:
    """Allocate blocks for ``tokens`` and register every full one, as a request that computed them."""
    hashes = block_hashes(tokens, BS, salt)
    blocks = pool.allocate(-(-len(tokens) // BS))
    for block, h in zip(blocks, hashes):
        pool.register(block, h)
    return blocks


def test_allocate_never_hands_out_reserved_blocks_and_refuses_past_capacity():
    """Blocks 0..reserved-1 are scratch; asking for more than is free raises; usage counts held blocks."""
    pool = BlockPool(num_blocks=6, block_size=BS, reserved=2)
    assert pool.num_blocks == pool.num_free == 4
    blocks = pool.allocate(3)
    assert blocks == [2, 3, 4] and pool.usage == 0.75
    with pytest.raises(MemoryError, match="need 2 blocks, 1 free"):
        pool.allocate(2)
    pool.free(blocks)
    assert pool.num_free == 4 and pool.usage == 0 and sorted(pool.allocate(4)) == [2, 3, 4, 5]


def test_hashes_chain_over_parent_tokens_and_salt():
    """Same tokens and salt give the same digests; another salt or another earlier block changes every
    later digest; a partial block has none."""
    a = block_hashes(list(range(10)), BS)
    assert len(a) == 2 and a == block_hashes(list(range(10)), BS)
    assert a[1] == hash_block(a[0], [4, 5, 6, 7])
    salted = block_hashes(list(range(8)), BS, salt=(10000.0, 1.0))
    assert salted[0] != a[0] and salted[1] != a[1]
    other_start = block_hashes([9, 1, 2, 3, 4, 5, 6, 7], BS)
    assert other_start[1] != a[1]  # same tokens in block 1, another parent


def test_find_cached_returns_the_longest_leading_run():
    """Lookup follows the chain from the first block and stops at the first block not cached."""
    pool = BlockPool(num_blocks=10, block_size=BS)
    blocks = cached_chain(pool, list(range(12)))
    assert pool.find_cached(block_hashes(list(range(12)), BS)) == blocks
    assert pool.find_cached(block_hashes(list(range(8)) + [99, 98, 97, 96], BS)) == blocks[:2]
    assert pool.find_cached(block_hashes([99] + list(range(1, 12)), BS)) == []
    assert pool.find_cached(block_hashes(list(range(12)), BS, salt=("other",))) == []


def test_freed_cached_blocks_stay_findable_until_allocation_evicts_them():
    """A cached block nobody holds keeps its content; taking it back removes it from the free queue;
    the counters add the lookup in tokens."""
    pool = BlockPool(num_blocks=5, block_size=BS)
    tokens = list(range(8))
    blocks = cached_chain(pool, tokens)
    pool.free(blocks)
    assert pool.num_free == 4 and pool.usage == 0 and all(pool.is_cached(b) for b in blocks)
    found = pool.find_cached(block_hashes(tokens, BS))
    assert found == blocks and pool.num_idle(found) == 2
    pool.take_cached(found, num_query_tokens=9)
    assert [pool.ref_count(b) for b in blocks] == [1, 1] and pool.num_free == 2
    assert (pool.queries, pool.hits) == (9, 8)
    pool.free(blocks)
    pool.allocate(4)  # every block, so the cached ones are evicted
    assert pool.find_cached(block_hashes(tokens, BS)) == [] and not any(pool.is_cached(b) for b in blocks)


def test_eviction_order_is_lru_uncached_first_and_chain_tail_first():
    """Allocation takes never-cached blocks first, then cached ones in the order they were freed,
    each freed chain from its last block, so a chain's head stays reachable longest."""
    pool = BlockPool(num_blocks=8, block_size=BS)
    old = cached_chain(pool, list(range(8)))
    new = cached_chain(pool, list(range(100, 108)))
    plain = pool.allocate(1)
    pool.free(old)
    pool.free(new)
    pool.free(plain)
    order = [pool.allocate(1)[0] for _ in range(7)]
    first_unused = [b for b in range(1, 8) if b not in old + new + plain]
    assert order == plain + first_unused + [old[1], old[0], new[1], new[0]]


def test_shared_block_is_never_evicted_while_held():
    """A block held by two requests survives one release; allocation cannot take it."""
    pool = BlockPool(num_blocks=4, block_size=BS)
    tokens = list(range(4))
    (block,) = cached_chain(pool, tokens)
    pool.take_cached(pool.find_cached(block_hashes(tokens, BS)), num_query_tokens=5)
    assert pool.ref_count(block) == 2
    pool.free([block])
    assert pool.ref_count(block) == 1 and pool.num_free == 2
    taken = pool.allocate(2)
    assert block not in taken and pool.is_cached(block)
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.free([block])
    pool.free(taken)
    assert pool.usage == 0


def test_register_keeps_the_first_copy_and_does_nothing_when_disabled():
    """Content computed twice at once stays cached under the first block; without prefix caching
    nothing is registered, found or counted."""
    pool = BlockPool(num_blocks=4, block_size=BS)
    (h,) = block_hashes(list(range(4)), BS)
    first, second = pool.allocate(2)
    pool.register(first, h)
    pool.register(second, h)
    assert pool.is_cached(first) and not pool.is_cached(second) and pool.find_cached([h]) == [first]

    off = BlockPool(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    (b,) = off.allocate(1)
    off.register(b, h)
    off.take_cached([], num_query_tokens=7)
    assert not off.is_cached(b) and off.find_cached([h]) == [] and (off.queries, off.hits) == (0, 0)


def test_a_chain_continued_from_its_parent_gives_the_same_digests():
    """Hashing a sequence in pieces (the scheduler hashes the blocks a request newly fills, after its earlier
    ones) gives the digests of hashing it whole, block for block as :func:`hash_block` makes them."""
    tokens, salt = list(range(3, 40)), (10000.0, 1.0)
    whole = block_hashes(tokens, BS, salt)
    assert len(whole) == 9
    assert block_hashes(tokens[:12], BS, salt) + block_hashes(tokens[12:], BS, salt, parent=whole[2]) == whole
    parent = None
    for i, digest in enumerate(whole):
        parent = hash_block(parent, tokens[i * BS:(i + 1) * BS], salt)
        assert parent == digest
