"""OpenAI's response objects, built from choice events.

Each endpoint answers in a format of its own: `ChatFormat` for /v1/chat/completions
(`chat.completion`, streamed as `chat.completion.chunk`) and `CompletionFormat` for
/v1/completions (`text_completion`, whole and streamed; with `echo`, the prompt first). A
format owns everything that differs between the two: the id prefix, the `object` names, the
shape of a choice and of its logprobs, and which chunks a stream sends in which order. Usage is counted the same
way for both (`Usage`), and both end a stream with the same usage chunk when asked to.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from splitinfer.protocol import TokenLogprobs
from splitinfer.protocol.tokenizer import Tokenizer
from splitinfer.server.errors import APIError
from splitinfer.server.generation import ChoiceEvent
from splitinfer.server.tool_calls import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    ParsedOutput,
    StreamEvent,
    ToolStreamParser,
)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


@dataclass(slots=True)
class Usage:
    """Token counts: the prompt once per distinct prompt, the completion over every choice."""

    choices_per_prompt: int  # the request's n: choice i belongs to prompt i // n
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    _prompts_seen: set[int] = field(default_factory=set)

    def add(self, event: ChoiceEvent) -> None:
        self.completion_tokens += len(event.token_ids)
        prompt_index = event.index // self.choices_per_prompt
        # Each of a prompt's choices reports the prompt's counts on its last event: count one.
        if event.finish_reason is not None and prompt_index not in self._prompts_seen:
            self._prompts_seen.add(prompt_index)
            self.prompt_tokens += event.num_prompt_tokens
            self.cached_tokens += event.num_cached_tokens

    def body(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(slots=True)
class ChoiceText:
    """One choice accumulated for a non-streamed response."""

    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # prompt tokens 1, 2, ...

    def add(self, event: ChoiceEvent) -> None:
        self.text += event.text
        self.logprobs += event.logprobs
        self.prompt_logprobs += event.prompt_logprobs
        self.finish_reason = event.finish_reason or self.finish_reason


@dataclass(frozen=True, slots=True)
class EchoedPrompt:
    """A prompt as completions' `echo` repeats it: its text, and its first token (which has no
    logprob, but has a place in the logprobs' tokens)."""

    text: str
    first_token_id: int


async def collect(events: AsyncIterator[ChoiceEvent], count: int, usage: Usage) -> list[ChoiceText]:
    """All `count` choices of a non-streamed request, counting their tokens into `usage`."""
    choices = [ChoiceText() for _ in range(count)]
    async for event in events:
        choices[event.index].add(event)
        usage.add(event)
    return choices


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What every object of one response repeats: its id, the model's name, its creation time."""

    id: str
    model: str
    created: int

    def fields(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def usage_chunk(head: ResponseHead, obj: str, usage: Usage) -> dict:
    """The last chunk with stream_options.include_usage: no choices, the whole request's usage."""
    return {**head.fields(obj), "system_fingerprint": None, "choices": [], "usage": usage.body()}


class ResponseWriter(ABC):
    """What an endpoint's answer needs to be sent (`OpenAIServer._respond`): the whole
    response, or the stream's chunks and how each goes out as a server-sent event."""

    prompt_param: ClassVar[str]  # the request field that holds the prompt, for errors about it
    ends_with_done: ClassVar[bool] = True  # chat and completions streams end with `data: [DONE]`

    @abstractmethod
    def head(self, model: str) -> ResponseHead:
        """The response's id, model and time, fixed before the first event."""

    @abstractmethod
    def body(self, head: ResponseHead, choices: list[ChoiceText], usage: Usage) -> dict:
        """The non-streamed response."""

    @abstractmethod
    def chunks(
        self, head: ResponseHead, events: AsyncIterator[ChoiceEvent], usage: Usage
    ) -> AsyncGenerator[dict, None]:
        """A stream's chunks, in order, counting the events into `usage`."""

    def sse(self, chunk: dict) -> dict:
        """One chunk as sse-starlette sends it."""
        return {"data": json.dumps(chunk)}

    def error_chunk(self, error: APIError) -> dict:
        """What a stream sends when it fails after its status went out."""
        return error.body()


@dataclass(frozen=True)
class ResponseFormat(ResponseWriter):
    """How one chat or completions response looks: built once per request by its endpoint."""

    tokenizer: Tokenizer  # to spell out the tokens of logprobs
    logprobs: int | None  # how many top logprobs per token; None: no logprobs asked for
    include_usage: bool = False  # stream_options.include_usage
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: top N per prompt token; None: not asked

    id_prefix: ClassVar[str]
    response_object: ClassVar[str]  # the whole response's `object`
    chunk_object: ClassVar[str]  # each streamed chunk's `object`

    def head(self, model: str) -> ResponseHead:
        return ResponseHead(new_id(self.id_prefix), model, now())

    def body(self, head: ResponseHead, choices: list[ChoiceText], usage: Usage) -> dict:
        """The non-streamed response. A prompt is scored by the first of its choices only
        (`choice_specs`): the others share that choice's prompt logprobs."""
        n = usage.choices_per_prompt
        for i, choice in enumerate(choices):
            if not choice.prompt_logprobs:
                choice.prompt_logprobs = choices[i - i % n].prompt_logprobs
        return {
            **head.fields(self.response_object),
            "choices": [self._choice(i, c) for i, c in enumerate(choices)],
            "usage": usage.body(),
            "system_fingerprint": None,
            **self._extra_fields(choices),
        }

    def _extra_fields(self, choices: list[ChoiceText]) -> dict:
        """Fields of the whole response beyond OpenAI's (vLLM's), if the request asked for them."""
        return {}

    def _vllm_prompt_logprobs(self, entries: list[TokenLogprobs]) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: None for the first prompt token, then for each token a map of
        token id -> {logprob, rank, decoded_token} holding the token itself and the top N."""
        out: list[dict | None] = [None]
        for entry in entries:
            ranked = {entry.token_id: (entry.logprob, entry.rank)}
            for rank, (token_id, logprob) in enumerate(entry.top[: self.prompt_logprobs], start=1):
                ranked.setdefault(token_id, (logprob, rank))
            out.append(
                {
                    str(token_id): {"logprob": lp, "rank": rank, "decoded_token": _token_text(self.tokenizer, token_id)}
                    for token_id, (lp, rank) in ranked.items()
                }
            )
        return out

    async def chunks(
        self, head: ResponseHead, events: AsyncIterator[ChoiceEvent], usage: Usage
    ) -> AsyncGenerator[dict, None]:
        """A stream's chunks, in order: each event's as it arrives (`_event_chunks`), counted into
        `usage`, then the usage chunk if the client asked for it."""
        sent: dict[int, int] = {}  # characters streamed so far per choice; absent before its first event
        async for event in events:
            usage.add(event)
            sent_before = sent.get(event.index)
            sent[event.index] = (sent_before or 0) + len(event.text)
            for chunk in self._event_chunks(head, event, sent_before):
                yield chunk
        if self.include_usage:
            yield usage_chunk(head, self.chunk_object, usage)

    def _chunk(self, head: ResponseHead, choice: dict) -> dict:
        chunk = {**head.fields(self.chunk_object), "system_fingerprint": None, "choices": [choice]}
        if self.include_usage:  # OpenAI sends "usage": null on every chunk but the last when usage is asked for
            chunk["usage"] = None
        return chunk

    def _wants_logprobs(self, entries: list[TokenLogprobs]) -> bool:
        return self.logprobs is not None and bool(entries)

    @abstractmethod
    def _choice(self, index: int, choice: ChoiceText) -> dict:
        """One choice of the non-streamed response."""

    @abstractmethod
    def _event_chunks(self, head: ResponseHead, event: ChoiceEvent, sent_before: int | None) -> Iterator[dict]:
        """The chunks one event becomes, in order; `sent_before` is how many characters of this
        choice were streamed before it, None if this is the choice's first event."""


@dataclass(frozen=True)
class ChatFormat(ResponseFormat):
    """/v1/chat/completions: a message per choice; a stream opens each choice with its role.

    With `tool_parser` (a request whose tool calls are parsed), each choice's text goes through
    its own parser (`tool_calls.py`): the message gets `tool_calls` and the rest as `content`,
    and a stream sends `delta.tool_calls` (index, id and name first, then argument fragments)
    as OpenAI does. A choice that called a tool and stopped finishes with "tool_calls". Both
    paths run the same parser over the same text, so a stream adds up to the whole answer."""

    tool_parser: Callable[[], ToolStreamParser] | None = None
    _parsers: dict[int, ToolStreamParser] = field(default_factory=dict)  # per streamed choice
    _called: set[int] = field(default_factory=set)  # streamed choices that started a call

    id_prefix = "chatcmpl"
    prompt_param = "messages"
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _extra_fields(self, choices: list[ChoiceText]) -> dict:
        # vLLM puts a chat's prompt logprobs on the response: every choice shares the one prompt.
        if self.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": self._vllm_prompt_logprobs(choices[0].prompt_logprobs)}

    def _choice(self, index: int, choice: ChoiceText) -> dict:
        logprobs = None if self.logprobs is None else self._logprobs(choice.logprobs)
        message: dict = {"role": "assistant", "content": choice.text}
        finish_reason = choice.finish_reason
        if self.tool_parser is not None:
            parser = self.tool_parser()
            parsed = ParsedOutput.from_events(parser.feed(choice.text) + parser.finish())
            message["content"] = parsed.content  # what the stream's content deltas add up to
            if parsed.calls:
                message["content"] = parsed.content or None  # OpenAI: null beside calls without text
                message["tool_calls"] = [
                    {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                    for call in parsed.calls
                ]
                finish_reason = _tool_finish(finish_reason)
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}

    def _event_chunks(self, head: ResponseHead, event: ChoiceEvent, sent_before: int | None) -> Iterator[dict]:
        if sent_before is None:  # the role, once, on each choice's first chunk
            yield self._delta(head, event.index, {"role": "assistant", "content": ""})
        logprobs = self._logprobs(event.logprobs) if self._wants_logprobs(event.logprobs) else None
        deltas = self._deltas(event) if self.tool_parser is not None else [{"content": event.text}] * bool(event.text)
        if logprobs and not deltas:
            deltas = [{"content": ""}]
        for i, delta in enumerate(deltas):  # the step's logprobs ride on its first chunk
            yield self._delta(head, event.index, delta, logprobs if i == 0 else None)
        if event.finish_reason is not None:  # its own chunk, with an empty delta, as OpenAI sends it
            finish = _tool_finish(event.finish_reason) if event.index in self._called else event.finish_reason
            yield self._delta(head, event.index, {}, finish_reason=finish)

    def _deltas(self, event: ChoiceEvent) -> list[dict]:
        """The deltas of one event's text through its choice's tool-call parser."""
        parser = self._parsers.get(event.index)
        if parser is None:
            parser = self._parsers[event.index] = self.tool_parser()
        events: list[StreamEvent] = parser.feed(event.text)
        if event.finish_reason is not None:
            events += parser.finish()
        deltas: list[dict] = []
        for item in events:
            if isinstance(item, ContentDelta):
                if deltas and "content" in deltas[-1]:
                    deltas[-1]["content"] += item.text
                else:
                    deltas.append({"content": item.text})
            elif isinstance(item, CallStart):
                self._called.add(event.index)
                function = {"name": item.name, "arguments": ""}
                deltas.append(
                    {"tool_calls": [{"index": item.index, "id": item.id, "type": "function", "function": function}]}
                )
            elif isinstance(item, ArgumentsDelta):
                deltas.append({"tool_calls": [{"index": item.index, "function": {"arguments": item.text}}]})
        return deltas

    def _delta(
        self,
        head: ResponseHead,
        index: int,
        delta: dict,
        logprobs: dict | None = None,
        finish_reason: str | None = None,
    ) -> dict:
        return self._chunk(head, {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})

    def _logprobs(self, entries: list[TokenLogprobs]) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            text = _token_text(self.tokenizer, token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[: self.logprobs]]}
                for e in entries
            ]
        }


@dataclass(frozen=True)
class CompletionFormat(ResponseFormat):
    """/v1/completions: text per choice; a stream sends one chunk per event, finish included.

    With `echo` (one `EchoedPrompt` per prompt; choice i answers prompt i // `n`), each
    choice's text starts with its prompt's, and its logprobs with the prompt tokens' (the
    first one's logprob and alternatives `null`, as OpenAI's); `text_offset` counts through
    the prompt tokens' text, then from the end of the echoed prompt. A stream sends the
    echo as each choice's first chunk, once its prompt is scored (the engine scores it
    before the first token)."""

    echo: tuple[EchoedPrompt, ...] = ()
    n: int = 1
    _scored: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # per streamed choice, until echoed
    _echoed: set[int] = field(default_factory=set)  # streamed choices whose echo is sent

    id_prefix = "cmpl"
    prompt_param = "prompt"
    response_object = "text_completion"
    chunk_object = "text_completion"

    def _choice(self, index: int, choice: ChoiceText) -> dict:
        echo = self.echo[index // self.n] if self.echo else None
        text, logprobs = choice.text, None
        if self.logprobs is not None:
            logprobs = self._logprobs(choice.logprobs, len(echo.text) if echo else 0)
            if echo:
                logprobs = _joined(self._echo_logprobs(echo, choice.prompt_logprobs), logprobs)
        if echo:
            text = echo.text + text
        out = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason}
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = self._vllm_prompt_logprobs(choice.prompt_logprobs)
        return out

    def _event_chunks(self, head: ResponseHead, event: ChoiceEvent, sent_before: int | None) -> Iterator[dict]:
        if self.echo and event.index not in self._echoed:
            scored = self._scored.setdefault(event.index, [])
            scored += event.prompt_logprobs
            if not (event.text or event.token_ids or event.finish_reason):
                return  # still scoring the prompt
            self._echoed.add(event.index)
            yield self._echo_chunk(head, event.index, self._scored.pop(event.index))
        # text_offset counts from the start of the choice's text (after its echo), across chunks.
        start = (sent_before or 0) + (len(self.echo[event.index // self.n].text) if self.echo else 0)
        logprobs = self._logprobs(event.logprobs, start) if self._wants_logprobs(event.logprobs) else None
        if event.text or logprobs or event.finish_reason:
            yield self._chunk(
                head,
                {"index": event.index, "text": event.text, "logprobs": logprobs, "finish_reason": event.finish_reason},
            )

    def _echo_chunk(self, head: ResponseHead, index: int, scored: list[TokenLogprobs]) -> dict:
        echo = self.echo[index // self.n]
        logprobs = self._echo_logprobs(echo, scored) if self.logprobs is not None else None
        return self._chunk(head, {"index": index, "text": echo.text, "logprobs": logprobs, "finish_reason": None})

    def _echo_logprobs(self, echo: EchoedPrompt, scored: list[TokenLogprobs]) -> dict:
        """The prompt's part of the logprobs: its first token with nulls, then each scored token
        with as many alternatives as `logprobs` asks (the engine may have scored more, for
        vLLM's prompt_logprobs)."""
        first = _token_text(self.tokenizer, echo.first_token_id)
        rest = self._logprobs(scored, len(first), top=self.logprobs)
        return _joined({"tokens": [first], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}, rest)

    def _logprobs(self, entries: list[TokenLogprobs], text_start: int, top: int | None = None) -> dict:
        """`top`: how many alternatives to keep; None keeps every one the engine sent (for the
        completion's tokens that is the count asked for)."""
        tokens = [_token_text(self.tokenizer, e.token_id) for e in entries]
        offsets, position = [], text_start
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_token_text(self.tokenizer, t): lp for t, lp in e.top[:top]} for e in entries],
            "text_offset": offsets,
        }


def _joined(first: dict, second: dict) -> dict:
    """Two runs of completions logprobs, one after the other."""
    return {key: first[key] + second[key] for key in first}


def _tool_finish(reason: str | None) -> str | None:
    """A choice that called a tool and stopped finishes with "tool_calls", as OpenAI's do; one
    cut by max_tokens keeps "length"."""
    return "tool_calls" if reason == "stop" else reason


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)
