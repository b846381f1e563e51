"""KV block pool: free list, reference counts and automatic prefix caching (docs/engine.md, "KV cache
and prefix caching").

Blocks are numbered ``0 .. num_blocks - 1``; the first ``reserved`` are never handed out (scratch space
of padded CUDA-graph rows). A block in use has a reference count: the requests whose block table holds
it. A *full* block whose tokens are all known and computed can be registered under its hash, chained
over its parent block's hash, its token ids and, for the first block, the request's ``cache_salt``
(the same tokens under another RoPE are other keys). A block whose count drops to zero goes to the LRU
free queue; a registered one keeps its content and hash there and can be taken again by a request with
the same prefix, until a block must be allocated and it is evicted (its hash dropped).

Hash choice: SHA-256 of the parent digest, the token ids (8 bytes each) and the salt's ``repr``. A
collision would silently serve one prompt another prompt's KV, so the digest must resist crafted
collisions too (Python's ``hash()`` of a tuple does not); at one digest per ``block_size`` tokens the
cost is negligible next to a forward pass.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def _link(parent: bytes | None, salt: tuple, block: bytes | memoryview) -> bytes:
    """One link of the chain: the digest of a block's ids (as int64 bytes) after ``parent``'s, or after the salt
    for the first block."""
    h = hashlib.sha256(parent if parent is not None else b"salt:" + repr(salt).encode())
    h.update(block)
    return h.digest()


def hash_block(parent: bytes | None, token_ids: Sequence[int], salt: tuple = ()) -> bytes:
    """Digest of one full block: chained over ``parent`` (None for the first block, which takes the
    ``salt`` instead). ``salt`` must be made of values with a stable ``repr`` (numbers, strings, tuples)."""
    return _link(parent, salt, array("q", token_ids).tobytes())


def block_hashes(token_ids: Sequence[int], block_size: int, salt: tuple = (),
                 parent: bytes | None = None) -> list[bytes]:
    """Chained digests of every full block of ``token_ids`` (a trailing partial block has none), continuing
    the chain after ``parent`` (the digest of the block before the first, None at the start of a sequence):
    :func:`hash_block` of each, the ids converted to bytes once."""
    ids = array("q", token_ids)
    data = memoryview(ids.tobytes())
    step = block_size * ids.itemsize
    hashes: list[bytes] = []
    for start in range(0, len(data) - step + 1, step):
        parent = _link(parent, salt, data[start:start + step])
        hashes.append(parent)
    return hashes


class BlockPool:
    """Hands out KV blocks and remembers full ones by their hash (when prefix caching is on)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, reserved: int = 1):
        if not 0 <= reserved < num_blocks:
            raise ValueError(f"a pool of {num_blocks} blocks cannot keep {reserved} reserved and hand out any")
        self.num_blocks = num_blocks - reserved
        """Blocks that can be handed out (the reserved ones excluded)."""
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.queries = 0
        """Tokens looked up in the prefix cache at admissions."""
        self.hits = 0
        """Tokens of those found in the cache."""
        self._refs = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        # Blocks no request uses, in eviction order (first = next to go); ids in ascending order at start.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(reserved, num_blocks))

    def reset_prefix_cache(self) -> None:
        """Forget every cached block and the hit figures (no request may hold a block)."""
        if any(self._refs):
            raise RuntimeError("the prefix cache can only be reset while no request holds a block")
        self._hash = [None] * len(self._hash)
        self._cached.clear()
        self.queries = self.hits = 0

    @property
    def num_free(self) -> int:
        """Blocks :meth:`allocate` can hand out: unused ones, cached ones included (they get evicted)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks at least one request holds."""
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the blocks in use (cached blocks nobody holds count as free)."""
        return self.num_used / self.num_blocks

    def ref_count(self, block: int) -> int:
        """How many requests hold ``block``."""
        return self._refs[block]

    def is_cached(self, block: int) -> bool:
        """``block`` is registered in the prefix cache (its content must not change)."""
        return self._hash[block] is not None

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks for one request, evicting the least recently freed cached ones when needed;
        raises ``MemoryError`` when fewer than ``n`` are free (callers check :attr:`num_free` first)."""
        if n > len(self._free):
            raise MemoryError(f"KV cache exhausted: need {n} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            if self._hash[block] is not None:
                del self._cached[self._hash[block]]
                self._hash[block] = None
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """One request lets go of ``blocks`` (its block table, in order). Blocks nobody holds any more
        join the free queue: uncached ones at the front (their content is worthless), cached ones at the
        back, last block first, so a chain is evicted from its end and its head stays reachable."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if self._hash[block] is None:
                    self._free.move_to_end(block, last=False)

    def find_cached(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks of the longest leading run of ``hashes`` found in the cache (no reference taken)."""
        blocks: list[int] = []
        if self.enable_prefix_caching:
            for h in hashes:
                block = self._cached.get(h)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def num_idle(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` nobody holds: taking them lowers :attr:`num_free` by as many."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def take_cached(self, blocks: Sequence[int], num_query_tokens: int) -> None:
        """A request is admitted with ``blocks`` (what :meth:`find_cached` returned) as the start of its
        block table, after looking up ``num_query_tokens`` tokens: each block gets one more holder, and
        the counters record the lookup."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        if self.enable_prefix_caching:
            self.queries += num_query_tokens
            self.hits += len(blocks) * self.block_size

    def register(self, block: int, block_hash: bytes) -> None:
        """Remember a held full block whose tokens are all known and computed. A block already
        registered, or content already cached in another block (computed twice at once), is left as is."""
        if not self.enable_prefix_caching or self._hash[block] is not None or block_hash in self._cached:
            return
        self._hash[block] = block_hash
        self._cached[block_hash] = block
