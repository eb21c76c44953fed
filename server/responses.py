"""OpenAI's response objects, built from choice events: `chat.completion`,
`chat.completion.chunk`, `text_completion` (whole and streamed), usage and logprobs."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from splitinfer.protocol import TokenLogprobs
from splitinfer.server.generation import ChoiceEvent
from splitinfer.server.tokenizer import ServerTokenizer


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(slots=True)
class Usage:
    """Token counts: the prompt once per distinct prompt, the completion over every choice."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    _prompts_seen: set[int] = field(default_factory=set)

    def add(self, event: ChoiceEvent, prompt_index: int) -> None:
        self.completion_tokens += len(event.token_ids)
        if event.finish_reason is not None and prompt_index not in self._prompts_seen:
            self._prompts_seen.add(prompt_index)
            self.prompt_tokens += event.num_prompt_tokens
            self.cached_tokens += event.num_cached_tokens

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(slots=True)
class ChoiceText:
    """One choice accumulated for a non-streamed response."""

    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: ChoiceEvent) -> None:
        self.text += event.text
        self.logprobs += event.logprobs
        self.finish_reason = event.finish_reason or self.finish_reason


def _token_text(tokenizer: ServerTokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer: ServerTokenizer, entries: list[TokenLogprobs], top: int) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob),
                         "top_logprobs": [item(t, lp) for t, lp in e.top[:top]]} for e in entries]}


def completion_logprobs(tokenizer: ServerTokenizer, entries: list[TokenLogprobs], text_start: int) -> dict:
    tokens = [_token_text(tokenizer, e.token_id) for e in entries]
    offsets, position = [], text_start
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def chat_completion(response_id: str, model: str, created: int, choices: list[ChoiceText], usage: Usage,
                    tokenizer: ServerTokenizer, top_logprobs: int | None) -> dict:
    return {
        "id": response_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": i,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": None if top_logprobs is None else chat_logprobs(tokenizer, c.logprobs, top_logprobs),
            "finish_reason": c.finish_reason,
        } for i, c in enumerate(choices)],
        "usage": usage.body(),
        "system_fingerprint": None,
    }


def text_completion(response_id: str, model: str, created: int, choices: list[ChoiceText], usage: Usage,
                    tokenizer: ServerTokenizer, logprobs: int | None) -> dict:
    return {
        "id": response_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{
            "index": i, "text": c.text,
            "logprobs": None if logprobs is None else completion_logprobs(tokenizer, c.logprobs, 0),
            "finish_reason": c.finish_reason,
        } for i, c in enumerate(choices)],
        "usage": usage.body(),
        "system_fingerprint": None,
    }


def chat_chunk(response_id: str, model: str, created: int, index: int, delta: dict,
               logprobs: dict | None = None, finish_reason: str | None = None, include_usage: bool = False) -> dict:
    chunk = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if include_usage:  # OpenAI sends "usage": null on every chunk but the last when usage is asked for
        chunk["usage"] = None
    return chunk


def completion_chunk(response_id: str, model: str, created: int, index: int, text: str,
                     logprobs: dict | None = None, finish_reason: str | None = None,
                     include_usage: bool = False) -> dict:
    chunk = {"id": response_id, "object": "text_completion", "created": created, "model": model,
             "system_fingerprint": None,
             "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(response_id: str, model: str, created: int, obj: str, usage: Usage) -> dict:
    """The last chunk with stream_options.include_usage: no choices, the whole request's usage."""
    return {"id": response_id, "object": obj, "created": created, "model": model, "system_fingerprint": None,
            "choices": [], "usage": usage.body()}


def now() -> int:
    return int(time.time())
