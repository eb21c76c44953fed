"""One request's state while it generates."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitinfer.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class Sequence:
    """Prompt and generated tokens, the KV blocks that hold them, and why it finished."""

    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, stop_ids: frozenset[int], max_model_len: int) -> None:
        """Add a generated token and decide whether the sequence is done."""
        self.output_token_ids.append(token_id)
        if token_id in stop_ids or token_id in self.params.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output_token_ids) >= self.params.max_tokens or self.num_tokens >= max_model_len:
            self.finish_reason = "length"
