"""One request's state while it is scheduled, computed and sampled."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import llguidance
import torch

from splitinfer.engine.grammar import GrammarError
from splitinfer.protocol.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Request:
    """Tokens (prompt then output), how many have K/V in the cache, and the blocks holding them.

    `num_computed_tokens` counts tokens whose K/V are written; the next forward feeds
    tokens from there on. After a preemption it drops to 0 and the whole sequence, its
    outputs included, is recomputed; tokens already emitted are never emitted again.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    # Prefix-cache keys of the sequence's full blocks, in order (block i has key block_keys[i]).
    block_keys: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    # The grammar's state over the output so far (constrained requests only). It advances only
    # here, as tokens are committed, so a recomputed or retried step sees the same state.
    matcher: llguidance.LLMatcher | None = None
    # With prompt logprobs: positions before this one have had their logits' verdict on the
    # next prompt token reported (position q scores prompt token q + 1). It only grows, so a
    # prompt recomputed after a preemption reports nothing twice.
    num_scored_positions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def scoring_pending(self) -> bool:
        """Whether prompt tokens remain whose logprobs were asked for and not yet reported."""
        return self.params.prompt_logprobs is not None and self.num_scored_positions < self.num_prompt_tokens - 1

    @property
    def prefix_cache_limit(self) -> int:
        """How many leading tokens may come from the prefix cache: the cache holds K/V, not the
        logits that score prompt tokens, so a request still scoring its prompt computes every
        position from the first one it has not scored."""
        return self.num_scored_positions if self.scoring_pending else self.num_tokens

    def scored_positions(self, start: int, end: int) -> range:
        """The positions among [start, end), a forward's new tokens, whose logits score a prompt
        token not yet reported: position q scores prompt token q + 1."""
        if self.params.prompt_logprobs is None:
            return range(0)
        return range(max(start, self.num_scored_positions), min(end, self.num_prompt_tokens - 1))

    def append_token(self, token_id: int, stop_ids: frozenset[int], max_model_len: int) -> str | None:
        """Add a sampled token; return the finish reason if it ends the sequence: "stop" too when
        it completes the request's grammar. Raises `GrammarError` if the grammar refuses it."""
        self.token_ids.append(token_id)
        p = self.params
        if self.matcher is not None:
            if not self.matcher.consume_token(token_id):
                raise GrammarError(f"the grammar refused token {token_id}: {self.matcher.get_error()}")
            if self.matcher.is_stopped():
                return "stop"
        if self.num_output_tokens >= p.min_tokens and (
            (token_id in stop_ids and not p.ignore_eos) or token_id in p.stop_token_ids
        ):
            return "stop"
        if self.num_output_tokens >= p.max_tokens or self.num_tokens >= max_model_len:
            return "length"
        return None
