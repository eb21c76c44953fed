"""The caching block allocator: KV-cache blocks with refcounts, prefix reuse and LRU eviction.

Every block of the KV cache is in exactly one of two states: *in use* (refcount > 0,
held by one or more running sequences) or *free* (refcount 0, in the LRU queue). A
free block may still hold a cached prefix: a full block is registered once its K/V are
written, stays findable after its sequence frees it, and is evicted only when the
allocator hands it out again, least recently freed first. A new sequence reuses the
longest chain of cached full blocks matching its prompt; sequences sharing a prefix
share blocks.

The prefix cache is a trie kept in one hash table: a block is found by the entry
(parent key, its token ids), where a key is a number given to each registered block
from a counter and never reused (0, `ROOT_KEY`, is the empty prefix). The table hashes
the entry and compares it, tokens and all, with the stored one, so a key names exactly
one token prefix: no hash collision, accidental or crafted by a client to read another
client's cached K/V, can serve a block computed after different tokens (prefix caches
keyed by a chained hash alone are open to that; vLLM's CVE-2025-25183).

All operations are O(1) per block: the free queue is an OrderedDict (pop the oldest,
or remove a cached block from the middle when a prefix hit revives it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

# The key of the (empty) prefix before a sequence's first block; registered blocks get 1, 2, ...
ROOT_KEY = 0

# What the prefix cache looks a block up by: its parent's key and its own token ids.
CacheEntry = tuple[int, tuple[int, ...]]


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    # Set while the block is registered in the prefix cache: the key of the prefix it ends.
    key: int | None = None
    parent_key: int = ROOT_KEY
    token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class BlockPoolStats:
    total_blocks: int
    used_blocks: int
    free_blocks: int
    cached_blocks: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


@dataclass(slots=True)
class PrefixMatch:
    """Cached blocks covering the start of a prompt, with the key of each."""

    block_ids: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)

    @property
    def last_key(self) -> int:
        return self.keys[-1] if self.keys else ROOT_KEY


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first; the values are unused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[CacheEntry, int] = {}  # (parent key, token ids) -> block id
        self._last_key = ROOT_KEY
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def stats(self) -> BlockPoolStats:
        return BlockPoolStats(
            total_blocks=self.num_blocks,
            used_blocks=self.num_blocks - self.num_free,
            free_blocks=self.num_free,
            cached_blocks=len(self._cached),
            prefix_queried_tokens=self.prefix_queried_tokens,
            prefix_hit_tokens=self.prefix_hit_tokens,
        )

    def match_prefix(self, token_ids: list[int]) -> PrefixMatch:
        """The longest chain of cached full blocks equal to the start of `token_ids`.

        The last token is never matched (its logits are needed, so it is always computed).
        Blocks found are not yet taken: call `take_cached` for them.
        """
        match = PrefixMatch()
        if not self.enable_prefix_caching:
            return match
        bs = self.block_size
        for start in range(0, len(token_ids) - 1 - bs + 1, bs):
            block_id = self._cached.get((match.last_key, tuple(token_ids[start : start + bs])))
            if block_id is None:
                break
            match.block_ids.append(block_id)
            match.keys.append(self.blocks[block_id].key)
        return match

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queried_tokens += num_tokens
        self.prefix_hit_tokens += num_hit_tokens

    def take_cached(self, block_ids: list[int]) -> None:
        """Add a reference to each (matched) cached block, reviving it from the free queue if needed."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks (refcount 1), evicting the least recently freed cached ones.

        Raises MemoryError if fewer than `count` blocks are free; check `num_free` first.
        """
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV blocks, {len(self._free)} free")
        ids = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.key is not None:
                self._evict(block)
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block. Blocks reaching zero join the free queue, the
        sequence's last blocks first, so that a prefix's head outlives its tail in the cache."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def register_full_block(self, block_id: int, parent_key: int, token_ids: tuple[int, ...]) -> int:
        """Make a block whose K/V are now written (after the prefix `parent_key`) findable by
        later prompts; returns the key of the prefix it ends, the parent of the next block.

        If the same prefix is already cached (two sequences computed it side by side), that
        entry stays, this block remains private, and the cached block's key is returned, so
        that the sequence's later blocks still chain onto the cached prefix.
        """
        if not self.enable_prefix_caching:
            return ROOT_KEY
        entry = (parent_key, token_ids)
        cached = self._cached.get(entry)
        if cached is not None:
            return self.blocks[cached].key
        block = self.blocks[block_id]
        if block.key is not None:
            raise RuntimeError(f"KV block {block_id} is already cached under key {block.key}")
        self._last_key += 1
        block.key, block.parent_key, block.token_ids = self._last_key, parent_key, token_ids
        self._cached[entry] = block_id
        return block.key

    def _evict(self, block: Block) -> None:
        del self._cached[(block.parent_key, block.token_ids)]
        block.key, block.parent_key, block.token_ids = None, ROOT_KEY, ()
