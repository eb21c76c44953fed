"""OpenAI request bodies -> validated requests, then one engine request per choice
(`choice_specs`, each with its own `SamplingParams`).

Every error is an `APIError` 400 naming the offending `param`. Unknown fields are ignored
(clients send fields we have never heard of); a known feature we do not support (legacy
functions, audio, suffix, ...) is refused rather than silently dropped. vLLM's extensions
are accepted at the top level, which is where the OpenAI SDK's `extra_body` puts them:
top_k, min_p, repetition_penalty, min_tokens, stop_token_ids, ignore_eos, prompt_logprobs
(the prompt's logprobs, vLLM's shape; not with streaming, as vLLM), and its
structured-output fields. Completions' `echo` puts each prompt before its choices' text and,
with `logprobs`, the prompt tokens' logprobs before theirs (the first token's `null`), which
the engine computes from the prefill (`max_tokens` 0 with echo scores the prompt only).
An output constraint (`response_format`, vLLM's
`structured_outputs` and `guided_*`) is read by `structured_output.py`, chat's tools by
`tool_request.py`; both end up in the choices' `SamplingParams.constraint`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import msgspec

from splitinfer.protocol import SamplingParams
from splitinfer.protocol.constraint import Constraint
from splitinfer.protocol.errors import ProtocolError, show
from splitinfer.protocol.fields import MAX_INT, MAX_TOKEN_ID, MIN_INT
from splitinfer.protocol.sampling_params import MAX_LOGPROBS  # completions too: OpenAI caps it at 5
from splitinfer.server.errors import bad_request
from splitinfer.server.generation import ChoiceSpec
from splitinfer.server.model_context import ChatPromptOptions
from splitinfer.server.responses import new_id
from splitinfer.server.structured_output import parse_constraint
from splitinfer.server.tool_request import ToolRequest, parse_tools

MAX_N = 128
MAX_STOP_STRINGS = 16
MAX_TOKEN_ID_DIGITS = len(str(MAX_TOKEN_ID))
EXTRA_SAMPLING_FIELDS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos")

# Known OpenAI features we do not implement, and the values that mean "not used".
UNSUPPORTED_CHAT = {
    "functions": (None, []),  # the legacy form of tools
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
}
UNSUPPORTED_COMPLETIONS = {"suffix": (None, "")}


@dataclass(frozen=True, slots=True)
class Common:
    """What chat and completions requests share."""

    model: str
    n: int
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    max_tokens: int | None  # None: as many as the context allows
    params: SamplingParams  # per-choice settings; max_tokens and seed are set per choice
    constraint_param: str | None  # the parameter params.constraint came from, for errors about it
    prompt_logprobs: int | None  # vLLM's prompt_logprobs: the prompt's logprobs in the response, top N each


@dataclass(frozen=True, slots=True)
class ChatRequest:
    common: Common
    messages: list[dict]
    logprobs: bool
    top_logprobs: int
    tools: ToolRequest | None
    prompt_options: ChatPromptOptions


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    common: Common
    prompts: list[str | list[int]]  # several prompts make several groups of n choices
    logprobs: int | None
    echo: bool  # each choice's text and logprobs begin with its prompt's


def typed_field(body: dict, name: str, types: type | tuple[type, ...], what: str, default: object = None) -> object:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad_request(f"'{name}' must be {what}, got {value!r}", param=name)
    if not isinstance(value, types):
        raise bad_request(f"'{name}' must be {what}, got {type(value).__name__}", param=name)
    return value


def _int_in(body: dict, name: str, low: int, high: int, default: int | None = None) -> int | None:
    """An optional integer field in [low, high] (the message never prints a huge int: str()
    refuses past 4300 digits, and a 500 would follow)."""
    value = typed_field(body, name, int, "an integer")
    if value is None:
        return default
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be in [{low}, {high}], got {show(value)}", param=name)
    return value


def _refuse_unsupported(body: dict, unsupported: dict[str, tuple]) -> None:
    for name, harmless in unsupported.items():
        if name in body and body[name] not in harmless:
            raise bad_request(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("'stop' must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' may hold at most {MAX_STOP_STRINGS} strings", param="stop")
    return tuple(stops)


def _logit_bias(body: dict) -> dict[int, object]:
    """JSON object keys are strings: each must be a token id written in ASCII digits (int()
    would also take "+5", " 5", "5_0" and other scripts' digits). The values are judged by
    SamplingParams."""
    bias = typed_field(body, "logit_bias", dict, "an object of token id -> bias", {})
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= MAX_TOKEN_ID_DIGITS):
            raise bad_request(f"'logit_bias' keys must be token ids, got {show(key)}", param="logit_bias")
        out[int(key)] = value
    return out


def _sampling_params(
    body: dict, logprobs: int | None, constraint: Constraint | None, prompt_logprobs: int | None
) -> SamplingParams:
    """Build the choice template; SamplingParams checks every range and names the field."""
    fields = {
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "presence_penalty": body.get("presence_penalty"),
        "frequency_penalty": body.get("frequency_penalty"),
        "seed": body.get("seed"),
        "logit_bias": _logit_bias(body),
        "logprobs": logprobs,
        "constraint": constraint,
        "prompt_logprobs": prompt_logprobs,
        **{name: body.get(name) for name in EXTRA_SAMPLING_FIELDS},
    }
    if isinstance(fields["stop_token_ids"], list):
        fields["stop_token_ids"] = tuple(fields["stop_token_ids"])
    kwargs = {k: v for k, v in fields.items() if v is not None and k != "logprobs"}
    # max_tokens is set per choice once the prompt length is known (`choice_params`).
    return _build(lambda: SamplingParams(max_tokens=TEMPLATE_MAX_TOKENS, logprobs=logprobs, **kwargs))


TEMPLATE_MAX_TOKENS = 2**31 - 1


def _build(make) -> SamplingParams:
    """SamplingParams' refusal ("top_p must be a number <= 1.0, got 1.5") as a 400 naming the field."""
    try:
        return make()
    except ProtocolError as exc:
        raise bad_request(exc.message, param=exc.field) from None


def _common(
    body: dict,
    logprobs: int | None,
    max_tokens_fields: tuple[str, ...],
    min_max_tokens: int = 1,
    scored_prompt: int | None = None,
) -> Common:
    """What chat and completions share. `min_max_tokens`: 0 where the prompt alone may be
    scored; `scored_prompt`: top alternatives the endpoint itself needs at each prompt
    position (completions' echo with logprobs), None if none."""
    model = typed_field(body, "model", str, "a string")
    if not model:
        raise bad_request("'model' is required", param="model")
    n = _int_in(body, "n", 1, MAX_N, default=1)
    stream = typed_field(body, "stream", bool, "a boolean", False)
    options = typed_field(body, "stream_options", dict, "an object", {})
    if options and not stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", param="stream_options")
    include_usage = typed_field(options, "include_usage", bool, "a boolean", False)
    max_tokens = None
    for name in max_tokens_fields:  # the later name (max_completion_tokens) wins
        value = _int_in(body, name, min_max_tokens, MAX_INT)
        if value is not None:
            max_tokens = value
    typed_field(body, "user", str, "a string")  # OpenAI's end-user id: checked for its type, not used
    constraint, constraint_param = parse_constraint(body)
    prompt_logprobs = _int_in(body, "prompt_logprobs", 0, MAX_LOGPROBS)
    if prompt_logprobs is not None and stream:
        raise bad_request("'prompt_logprobs' is not available with 'stream': true", param="prompt_logprobs")
    # The engine scores the prompt once, with as many alternatives as anything here needs.
    scored = [n for n in (prompt_logprobs, scored_prompt) if n is not None]
    return Common(
        model=model,
        n=n,
        stream=stream,
        include_usage=include_usage,
        stop=_stop(body),
        max_tokens=max_tokens,
        params=_sampling_params(body, logprobs, constraint, max(scored) if scored else None),
        constraint_param=constraint_param,
        prompt_logprobs=prompt_logprobs,
    )


def parse_chat(body: dict) -> ChatRequest:
    _refuse_unsupported(body, UNSUPPORTED_CHAT)
    messages = parse_messages(body)
    logprobs = typed_field(body, "logprobs", bool, "a boolean", False)
    top_logprobs = _int_in(body, "top_logprobs", 0, MAX_LOGPROBS, default=0)
    if body.get("top_logprobs") is not None and not logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    common = _common(body, top_logprobs if logprobs else None, ("max_tokens", "max_completion_tokens"))
    tools = parse_tools(body)
    if tools is not None and tools.enforced and common.constraint_param is not None:
        raise bad_request(
            f"'{common.constraint_param}' cannot be combined with a required or named 'tool_choice': the call's "
            "format is the constraint",
            param="tool_choice",
        )
    return ChatRequest(
        common=common,
        messages=messages,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        tools=tools,
        prompt_options=parse_prompt_options(body),
    )


def parse_messages(body: dict) -> list:
    """The request's `messages` list (each message is checked as the template renders it)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", param="messages")
    return messages


def parse_prompt_options(body: dict) -> ChatPromptOptions:
    """vLLM's `add_generation_prompt`, `continue_final_message` and `add_special_tokens`."""
    default = ChatPromptOptions()
    return ChatPromptOptions(
        **{
            name: typed_field(body, name, bool, "a boolean", getattr(default, name))
            for name in ("add_generation_prompt", "continue_final_message", "add_special_tokens")
        }
    )


def parse_completion(body: dict) -> CompletionRequest:
    _refuse_unsupported(body, UNSUPPORTED_COMPLETIONS)
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise bad_request("'best_of' other than n is not supported", param="best_of", code="unsupported_parameter")
    logprobs = _int_in(body, "logprobs", 0, MAX_LOGPROBS)
    echo = typed_field(body, "echo", bool, "a boolean", False)
    scores_only = type(body.get("max_tokens")) is int and body["max_tokens"] == 0
    if scores_only and not echo:
        raise bad_request("'max_tokens' may be 0 only with 'echo': true (the prompt is scored)", param="max_tokens")
    # With echo and max_tokens 0 the engine must still score the prompt to have anything to do.
    scored = (logprobs or 0) if echo and (logprobs is not None or scores_only) else None
    common = _common(body, logprobs, ("max_tokens",), min_max_tokens=0, scored_prompt=scored)
    if common.max_tokens is None:
        common = replace(common, max_tokens=16)  # OpenAI's default for completions
    return CompletionRequest(common=common, prompts=_prompts(body.get("prompt")), logprobs=logprobs, echo=echo)


def _prompts(prompt: object) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""

    def is_ids(value: object) -> bool:
        return (
            isinstance(value, list)
            and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
        )

    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
        return list(prompt)
    raise bad_request(
        "'prompt' must be a string, a list of strings, a list of token ids, or a list of such lists", param="prompt"
    )


def with_constraint(common: Common, constraint: Constraint) -> Common:
    """`common` with every choice under `constraint` (a tool call's grammar)."""
    return replace(common, params=_build(lambda: msgspec.structs.replace(common.params, constraint=constraint)))


def choice_params(common: Common, max_tokens: int, index: int) -> SamplingParams:
    """The settings of choice `index`: its own seed (seed + index, wrapped within the signed
    64 bits seeds have) so that n seeded choices differ from each other yet repeat across calls.

    Only a prompt's first choice scores the prompt (the engine computes the whole prompt
    for that, without the prefix cache) and a whole response shares its entries with the
    prompt's other choices; a stream cannot wait for a sibling, so there every choice scores
    it, as does a choice that does nothing else (`max_tokens` 0)."""
    seed = None if common.params.seed is None else (common.params.seed + index - MIN_INT) % 2**64 + MIN_INT
    scored = common.params.prompt_logprobs
    if index % common.n and not common.stream and max_tokens > 0:
        scored = None
    return _build(
        lambda: msgspec.structs.replace(common.params, max_tokens=max_tokens, seed=seed, prompt_logprobs=scored)
    )


def choice_specs(
    common: Common, prompts: list[list[int]], max_tokens: int, keep_special: frozenset[int] = frozenset()
) -> list[ChoiceSpec]:
    """The engine requests of one HTTP request: n choices per prompt, numbered across prompts
    (choice i answers prompt i // n), under request ids that share one fresh base.
    `keep_special`: special tokens their text keeps (a tool-call format's markers)."""
    base = new_id("req")
    return [
        ChoiceSpec(
            index=p * common.n + i,
            request_id=f"{base}-{p * common.n + i}",
            prompt_token_ids=ids,
            params=choice_params(common, max_tokens, p * common.n + i),
            stop=common.stop,
            keep_special=keep_special,
        )
        for p, ids in enumerate(prompts)
        for i in range(common.n)
    ]
