"""Per-request generation settings, validated at construction.

Plain Python (no torch): the engine samples with them and the `Generate` message of the
protocol carries them, so servers build and validate them without importing the engine.

`SamplingParams` is the one judge of a request's settings: the servers, the engine's
socket and the offline `LLM` all build them through it. Every value it accepts is one the
engine can represent: integers fit the signed 64-bit ints the wire and torch carry (token
ids the wire's uint32), and every float is finite and inside a range chosen so that the
sampler's float32 arithmetic cannot overflow. An int given for a float is converted (after
the range check, which compares exactly, so no int is too large to judge).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitinfer.protocol.checks import MAX_INT, MAX_TOKEN_ID, MIN_INT, show

MAX_LOGPROBS = 20
# Above this temperature every distribution is as good as uniform; larger values are refused
# rather than carried into float32 arithmetic (2**63 once crashed the sampler).
MAX_TEMPERATURE = 100.0
# A repetition penalty divides or multiplies logits: bounded both ways so neither overflows.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0  # presence and frequency, as OpenAI


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    - `temperature` in [0, 100]: 0 is greedy (argmax); otherwise logits are divided by it.
    - `top_k`: keep the k most likely tokens; 0 or -1 keeps all (so does any k >= vocab).
    - `top_p` in (0, 1]: keep the smallest set of tokens whose probability reaches p.
    - `min_p` in [0, 1]: drop tokens less likely than min_p times the most likely one.
    - `seed` (a signed 64-bit int): a private random stream for this request, so the same
      seed gives the same tokens whatever else is batched with it; None draws from the
      engine's stream.
    - `presence_penalty`, `frequency_penalty` (OpenAI, in [-2, 2]): subtract the penalty
      once per token already generated / once per occurrence of it.
    - `repetition_penalty` in [0.01, 100], 1 is off: divide positive logits and multiply
      negative ones of every token seen in the prompt or output (as in transformers).
    - `logit_bias`: token id -> value added to its logit, in [-100, 100].
    - `min_tokens`: eos and stop tokens are suppressed until this many tokens are out.
    - `max_tokens`: the most tokens to generate (finish reason "length").
    - `stop_token_ids`: tokens that end the request (finish reason "stop"), besides eos.
    - `ignore_eos`: keep generating through the checkpoint's eos ids.
    - `logprobs`: None for none; N in [0, 20] returns the sampled token's log-probability
      and the N most likely tokens' at each step (from the model's raw distribution).

    Counts and ids are signed 64-bit ints at most; token ids (in `logit_bias` and
    `stop_token_ids`) are at most 2**32 - 1, and the engine refuses those past its vocabulary.
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
        _check_int("max_tokens", self.max_tokens, 1, MAX_INT)
        _check_int("min_tokens", self.min_tokens, 0, MAX_INT)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        self._set_float("temperature", 0.0, MAX_TEMPERATURE)
        _check_int("top_k", self.top_k, -1, MAX_INT)
        self._set_float("top_p", 0.0, 1.0, low_open=True)
        self._set_float("min_p", 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, MIN_INT, MAX_INT)
        self._set_float("presence_penalty", -MAX_PENALTY, MAX_PENALTY)
        self._set_float("frequency_penalty", -MAX_PENALTY, MAX_PENALTY)
        self._set_float("repetition_penalty", MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a mapping of token id to bias, got {self.logit_bias!r}")
        bias = {}
        for token, value in self.logit_bias.items():
            _check_int("logit_bias token id", token, 0, MAX_TOKEN_ID)
            bias[token] = _checked_float("logit_bias", value, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        object.__setattr__(self, "logit_bias", bias)
        if isinstance(self.stop_token_ids, (str, bytes, dict)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        stop = tuple(self.stop_token_ids)
        for token in stop:
            _check_int("stop_token_ids token id", token, 0, MAX_TOKEN_ID)
        object.__setattr__(self, "stop_token_ids", stop)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)

    def _set_float(self, name: str, low: float, high: float, low_open: bool = False) -> None:
        object.__setattr__(self, name, _checked_float(name, getattr(self, name), low, high, low_open))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def max_token_id(self) -> int:
        """The largest token id the params name (for checking against the vocabulary); -1 if none."""
        return max([*self.logit_bias, *self.stop_token_ids], default=-1)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {show(value)}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {show(value)}")


def _checked_float(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a float, if it is a number in the range (NaN never is). The comparison is
    exact for ints of any size, so the conversion afterwards cannot overflow."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {show(value)}")
    if not (low < value if low_open else low <= value) or not value <= high:  # also True for NaN
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}], got {show(value)}")
    return float(value)
