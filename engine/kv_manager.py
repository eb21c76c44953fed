"""Request-level KV-cache bookkeeping on top of the caching block allocator."""

from __future__ import annotations

from splitinfer.engine.block_pool import ROOT_KEY, BlockPool
from splitinfer.engine.request import Request


class KVCacheManager:
    """Gives sequences the blocks they need, reuses cached prefixes, and registers
    blocks in the prefix cache once their K/V are written."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def admit(self, seq: Request, budget: int) -> int:
        """Start a waiting sequence: reuse its longest cached prefix and allocate blocks for up to
        `budget` of its remaining tokens. Returns how many tokens to compute now; 0 when the
        blocks run out, and then the sequence holds nothing (a waiting request that kept blocks
        could, with others, hold the whole pool while nothing runs). Released prefix blocks stay
        cached, so the next attempt finds them again unless they were evicted meanwhile."""
        self._apply_prefix_cache(seq)
        n = min(seq.num_uncomputed_tokens, budget)
        if not self.allocate(seq, n):
            self.free(seq)
            return 0
        self.pool.record_prefix_query(seq.num_tokens, seq.num_cached_tokens)
        return n

    def _apply_prefix_cache(self, seq: Request) -> None:
        """Take the cached blocks of the sequence's longest cached prefix, within the part it may
        take from the cache (`Request.prefix_cache_limit`); count them as computed."""
        if seq.num_computed_tokens or seq.block_table:
            raise RuntimeError(f"request {seq.request_id}: prefix reuse applies only to a sequence with no blocks")
        match = self.pool.match_prefix(seq.token_ids)
        usable = seq.prefix_cache_limit // self.block_size
        block_ids, keys = match.block_ids[:usable], match.keys[:usable]
        self.pool.take_cached(block_ids)
        seq.block_table = list(block_ids)
        seq.block_keys = keys
        seq.num_computed_tokens = len(block_ids) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens

    def allocate(self, seq: Request, num_new_tokens: int) -> bool:
        """Extend the block table to hold `num_new_tokens` more tokens; False (and no change) if blocks run out."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > self.pool.num_free:
            return False
        if needed > 0:
            seq.block_table += self.pool.allocate(needed)
        return True

    def commit_computed(self, seq: Request) -> None:
        """Register every block that became full of computed tokens since the last call."""
        full = seq.num_computed_tokens // self.block_size
        parent = seq.block_keys[-1] if seq.block_keys else ROOT_KEY
        for i in range(len(seq.block_keys), full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            parent = self.pool.register_full_block(seq.block_table[i], parent, tokens)
            seq.block_keys.append(parent)

    def free(self, seq: Request) -> None:
        """Release the sequence's blocks (cached ones stay findable until evicted)."""
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.block_keys = []
        seq.num_computed_tokens = 0
