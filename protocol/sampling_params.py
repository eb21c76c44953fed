"""Per-request generation settings, validated at construction.

Plain Python (no torch): the engine samples with them and the `Generate` message of the
protocol carries them, so servers build and validate them without importing the engine.

`SamplingParams` is the one judge of a request's settings: the servers, the engine's
socket and the offline `LLM` all build them through it, and its field types hold every
bound (a refused value raises `ProtocolError` with code `invalid_request` and the field's
name). Every value it accepts is one the engine can represent: integers fit the signed
64-bit ints the wire and torch carry (token ids the wire's uint32), and every float is
finite and inside a range chosen so that the sampler's float32 arithmetic cannot overflow.
An int given for a float is converted.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from msgspec import Meta

from splitinfer.protocol.constraint import Constraint
from splitinfer.protocol.errors import ErrorCode
from splitinfer.protocol.fields import MAX_INT, Int64, TokenId
from splitinfer.protocol.structs import Struct

MAX_LOGPROBS = 20
# Above this temperature every distribution is as good as uniform; larger values are refused
# rather than carried into float32 arithmetic (2**63 once crashed the sampler).
MAX_TEMPERATURE = 100.0
# A repetition penalty divides or multiplies logits: bounded both ways so neither overflows.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0  # presence and frequency, as OpenAI


class SamplingParams(Struct, frozen=True, forbid_unknown_fields=True):
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
    - `max_tokens`: the most tokens to generate (finish reason "length"); 0 only with
      `prompt_logprobs` (the prompt is scored, nothing generated).
    - `stop_token_ids`: tokens that end the request (finish reason "stop"), besides eos.
    - `ignore_eos`: keep generating through the checkpoint's eos ids.
    - `logprobs`: None for none; N in [0, 20] returns the sampled token's log-probability
      and the N most likely tokens' at each step (from the model's raw distribution:
      before logit bias, penalties and the constraint's mask).
    - `prompt_logprobs`: None for none; N in [0, 20] returns, for each prompt token after
      the first, its log-probability given the tokens before it, its rank, and the N most
      likely tokens' there (`RequestOutput.prompt_logprobs`). Such a request computes its
      whole prompt: the prefix cache holds K/V, not logits.
    - `constraint`: what the output must match (`constraint.py`: a JSON schema, any JSON
      object, a regex, a choice of strings, a grammar); the request ends with "stop" as soon
      as the grammar is complete. None: unconstrained.

    Counts and ids are signed 64-bit ints at most; token ids (in `logit_bias` and
    `stop_token_ids`) are at most 2**32 - 1, and the engine refuses those past its vocabulary.
    """

    BUILD_ERROR_CODE: ClassVar[ErrorCode] = ErrorCode.INVALID_REQUEST
    NAMED_IN_ERRORS: ClassVar[bool] = False  # "top_p must be ...": the request's own words

    max_tokens: Annotated[int, Meta(ge=0, le=MAX_INT)] = 16
    min_tokens: Annotated[int, Meta(ge=0, le=MAX_INT)] = 0
    temperature: Annotated[float, Meta(ge=0.0, le=MAX_TEMPERATURE)] = 1.0
    top_k: Annotated[int, Meta(ge=-1, le=MAX_INT)] = 0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    seed: Int64 | None = None
    presence_penalty: Annotated[float, Meta(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    repetition_penalty: Annotated[float, Meta(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)] = 1.0
    logit_bias: dict[TokenId, Annotated[float, Meta(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] = {}
    stop_token_ids: tuple[TokenId, ...] = ()
    ignore_eos: bool = False
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    constraint: Constraint | None = None
    prompt_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None

    def _check(self) -> None:
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise self._fail("max_tokens", "must be >= 1 unless prompt_logprobs is set (then 0 scores the prompt only)")
        if self.min_tokens > self.max_tokens:
            raise self._fail("min_tokens", f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def max_token_id(self) -> int:
        """The largest token id the params name (for checking against the vocabulary); -1 if none."""
        return max([*self.logit_bias, *self.stop_token_ids], default=-1)
