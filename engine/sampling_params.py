"""Per-request generation settings, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    - `temperature`: 0 is greedy (argmax); otherwise logits are divided by it.
    - `top_k`: keep the k most likely tokens; 0 or -1 keeps all.
    - `top_p`: keep the smallest set of tokens whose probability reaches p; 1 keeps all.
    - `seed`: a private random stream for this request, so the same seed gives the same
      tokens whatever else is batched with it; None draws from the engine's stream.
    - `max_tokens`: the most tokens to generate (finish reason "length").
    - `stop_token_ids`: tokens that end the request (finish reason "stop"), besides eos.
    - `ignore_eos`: keep generating through the checkpoint's eos ids.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_int("top_k", self.top_k, minimum=-1)
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=-(2**63))
        stop = tuple(self.stop_token_ids)
        for token in stop:
            _check_int("stop_token_ids", token, minimum=0)
        object.__setattr__(self, "stop_token_ids", stop)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
