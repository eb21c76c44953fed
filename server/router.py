"""Choosing the replica for a request: least loaded, with prefix affinity.

Each engine keeps a prefix cache of its own, so a prompt whose beginning a replica has
already computed is cheaper there. The server cannot see the engines' caches; it remembers
instead which replica it sent which prompts to (`PrefixIndex`: an approximate prefix tree,
as SGLang's router keeps one). A prompt is cut into block-sized chunks (the engine caches
whole blocks), and chunk i is keyed by a hash chained over chunks 0..i, so one lookup per
chunk finds how far each replica's history matches the whole prefix.

`choose` then picks, among the live replicas of the model:
- the replica with the longest match, if the match covers at least `AFFINITY_MIN_SHARE` of
  the prompt and that replica is not much busier than the least loaded one (at most
  `slack(min_load)` more requests) and its KV cache is not nearly full;
- else the least loaded (ties taken in turn, so equal replicas alternate).

Load is what the engine runs and queues for everyone: this server's own requests, counted
as they are sent, plus the other servers' as the engine's last `StatsReply` showed them.
The index forgets what it saw longest ago past `MAX_ENTRIES` chunks, and a replica that
restarts comes back under a new engine id, so its old entries match nothing.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

MAX_ENTRIES = 1 << 18  # chunks remembered, over all replicas (a few tens of MB at most)
MAX_CHUNKS = 256  # chunks of one prompt looked at: the first 4096 tokens with 16-token blocks
AFFINITY_MIN_SHARE = 0.5  # a match worth following covers at least this share of the prompt
AFFINITY_SLACK_REQUESTS = 4  # how much busier than the least loaded a matching replica may be...
AFFINITY_SLACK_SHARE = 0.25  # ...plus this share of the least loaded one's load
KV_NEARLY_FULL = 0.95  # a replica this full would evict the prefix it is chosen for


def prefix_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """One hash per whole chunk of `block_size` tokens, each chained over the chunks before it."""
    hashes: list[int] = []
    running = 0
    for start in range(0, min(len(token_ids), MAX_CHUNKS * block_size) - block_size + 1, block_size):
        running = hash((running, tuple(token_ids[start : start + block_size])))
        hashes.append(running)
    return hashes


class PrefixIndex:
    """Which replicas were sent which prompt prefixes, most recent last (a bounded LRU)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._owners: OrderedDict[int, set[str]] = OrderedDict()  # chained chunk hash -> replica keys

    def __len__(self) -> int:
        return len(self._owners)

    def matches(self, hashes: list[int]) -> dict[str, int]:
        """For each replica, how many leading chunks of the prompt it was sent before."""
        matched: dict[str, int] = {}
        for i, key in enumerate(hashes):
            owners = self._owners.get(key)
            if not owners:
                break  # chained: no later chunk can match where this one does not
            for owner in owners:
                matched[owner] = i + 1
        return matched

    def insert(self, hashes: list[int], replica: str) -> None:
        for key in hashes:
            owners = self._owners.get(key)
            if owners is None:
                self._owners[key] = {replica}
            else:
                owners.add(replica)
                self._owners.move_to_end(key)
        while len(self._owners) > self.max_entries:
            self._owners.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Candidate:
    key: str  # the replica's engine id
    load: int  # requests it runs or queues, for every server
    kv_usage: float  # 0-1, from its last stats


def slack(min_load: int) -> float:
    return AFFINITY_SLACK_REQUESTS + AFFINITY_SLACK_SHARE * min_load


class Router:
    """`choose` for one model's replicas; one per server, shared by its models."""

    def __init__(self, index: PrefixIndex | None = None, affinity: bool = True) -> None:
        self.index = index or PrefixIndex()
        self.affinity = affinity
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate], token_ids: Sequence[int], block_size: int) -> str:
        """The replica for a prompt (module docstring); its prefix is remembered for it."""
        hashes = prefix_hashes(token_ids, block_size) if self.affinity else []
        chosen = self._pick(candidates, hashes, len(token_ids), block_size)
        if hashes:
            self.index.insert(hashes, chosen)
        return chosen

    def _pick(self, candidates: Sequence[Candidate], hashes: list[int], prompt_len: int, block_size: int) -> str:
        if len(candidates) == 1:
            return candidates[0].key
        min_load = min(c.load for c in candidates)
        if hashes:
            matched = self.index.matches(hashes)
            best = max(candidates, key=lambda c: (matched.get(c.key, 0), -c.load))
            # Of the part of the prompt the index looks at (its first MAX_CHUNKS blocks).
            share = matched.get(best.key, 0) * block_size / max(min(prompt_len, MAX_CHUNKS * block_size), 1)
            if (
                share >= AFFINITY_MIN_SHARE
                and best.load <= min_load + slack(min_load)
                and best.kv_usage < KV_NEARLY_FULL
            ):
                return best.key
        least = [c for c in candidates if c.load == min_load]
        return least[next(self._turn) % len(least)].key
