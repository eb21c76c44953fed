"""Per-request generation settings, validated at construction.

Plain Python (no torch): the engine samples with them and the `Generate` message of the
protocol carries them, so servers build and validate them without importing the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    - `temperature`: 0 is greedy (argmax); otherwise logits are divided by it.
    - `top_k`: keep the k most likely tokens; 0 or -1 keeps all.
    - `top_p`: keep the smallest set of tokens whose probability reaches p; 1 keeps all.
    - `min_p`: drop tokens less likely than min_p times the most likely one; 0 keeps all.
    - `seed`: a private random stream for this request, so the same seed gives the same
      tokens whatever else is batched with it; None draws from the engine's stream.
    - `presence_penalty`, `frequency_penalty` (OpenAI, in [-2, 2]): subtract the penalty
      once per token already generated / once per occurrence of it.
    - `repetition_penalty` (> 0, 1 is off): divide positive logits and multiply negative
      ones of every token seen in the prompt or output (as in transformers).
    - `logit_bias`: token id -> value added to its logit, in [-100, 100].
    - `min_tokens`: eos and stop tokens are suppressed until this many tokens are out.
    - `max_tokens`: the most tokens to generate (finish reason "length").
    - `stop_token_ids`: tokens that end the request (finish reason "stop"), besides eos.
    - `ignore_eos`: keep generating through the checkpoint's eos ids.
    - `logprobs`: None for none; N in [0, 20] returns the sampled token's log-probability
      and the N most likely tokens' at each step (from the model's raw distribution).
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        _check_range("temperature", self.temperature, 0.0, math.inf)
        _check_int("top_k", self.top_k, minimum=-1)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=-(2**63))
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a mapping of token id to bias, got {self.logit_bias!r}")
        for token, bias in self.logit_bias.items():
            _check_int("logit_bias", token, minimum=0)
            _check_range("logit_bias", bias, -100.0, 100.0)
        stop = tuple(self.stop_token_ids)
        for token in stop:
            _check_int("stop_token_ids", token, minimum=0)
        object.__setattr__(self, "stop_token_ids", stop)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def max_token_id(self) -> int:
        """The largest token id the params name (for checking against the vocabulary); -1 if none."""
        return max([*self.logit_bias, *self.stop_token_ids], default=-1)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_range(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")
