"""Running one HTTP request's choices in the engine and turning token ids into text.

Each choice (n per prompt) is its own engine request. They run concurrently and their
events are merged into one stream in arrival order. Each choice detokenizes
incrementally (never half a UTF-8 character) and watches its stop strings: on a match
the engine request is aborted at once and the text ends before the stop string. Leaving
the merged stream early (the HTTP client went away) cancels every choice, which aborts
them in the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from splitinfer.protocol import SamplingParams, TokenLogprobs
from splitinfer.protocol.tokenizer import Tokenizer
from splitinfer.server.detokenizer import IncrementalDetokenizer
from splitinfer.server.engine_client import EngineClient


@dataclass(frozen=True, slots=True)
class ChoiceSpec:
    index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    keep_special: frozenset[int] = frozenset()  # special tokens written into the text (tool-call markers)


@dataclass(slots=True)
class ChoiceEvent:
    """New text of one choice; `finish_reason` set on its last event (exactly once).
    `prompt_logprobs`: the next prompt tokens' entries, when the choice scores its prompt
    (they all come before its first token)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(slots=True)
class Timing:
    """When tokens arrived, for the TTFT and inter-token latency metrics."""

    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    token_gaps: list[float] = field(default_factory=list)
    last_token: float | None = None

    def tokens_arrived(self, count: int) -> None:
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None:
            self.token_gaps.append(now - self.last_token)
        self.last_token = now


class EngineFailure(Exception):
    """The engine ended a request abnormally (aborted by the engine, e.g. while shutting down)."""


async def run_choice(
    client: EngineClient, tokenizer: Tokenizer, spec: ChoiceSpec, timing: Timing
) -> AsyncIterator[ChoiceEvent]:
    detok = IncrementalDetokenizer(
        tokenizer, spec.prompt_token_ids, stop=list(spec.stop), keep_special=spec.keep_special
    )
    stream = client.generate(spec.request_id, spec.prompt_token_ids, spec.params)
    try:
        async for out in stream:
            if out.new_token_ids:
                timing.tokens_arrived(len(out.new_token_ids))
            text = detok.push(list(out.new_token_ids))
            finish = out.finish_reason
            if detok.stopped:
                finish = "stop"  # closing the stream below aborts the engine request
            elif finish == "abort":
                raise EngineFailure("the engine aborted the request")
            elif finish is not None:
                text += detok.finish()
            yield ChoiceEvent(
                spec.index,
                text,
                list(out.new_token_ids),
                list(out.logprobs or ()),
                finish,
                out.num_prompt_tokens,
                out.num_cached_tokens,
                list(out.prompt_logprobs or ()),
            )
            if finish is not None:
                return
    finally:
        await stream.aclose()


async def merged_choices(
    client: EngineClient, tokenizer: Tokenizer, specs: list[ChoiceSpec], timing: Timing
) -> AsyncGenerator[ChoiceEvent, None]:
    """Every choice's events, interleaved as they come. An engine failure in any choice ends
    the whole stream with that exception; the other choices are aborted."""
    queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

    async def pump(spec: ChoiceSpec) -> None:
        try:
            async for event in run_choice(client, tokenizer, spec, timing):
                queue.put_nowait(event)
        except Exception as exc:  # EngineUnavailable, EngineRequestError, EngineFailure: the consumer decides
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(spec)) for spec in specs]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
