"""/v1/responses' answer: a `response` object whose `output` is a list of items, and its
stream of typed events.

A reply is read as chat reads it (the same `ToolStreamParser` when tool calls are parsed),
and `OutputItems` turns the parser's events, in the order the model wrote them, into items:
each run of text is a `message` item with one `output_text` part, each call a
`function_call` item. Streamed, every change is an event (`response.output_item.added`,
`response.content_part.added`, `response.output_text.delta`, ...,
`response.function_call_arguments.delta`, `response.output_item.done`), numbered by
`sequence_number`, between `response.created` / `response.in_progress` and
`response.completed` (or `response.incomplete` when `max_output_tokens` cut the reply).
A whole response runs the same builder over the whole text, so the items a stream's events
add up to are the whole response's. SSE events carry their type as `event:`, and there is
no `[DONE]`, as OpenAI streams them.
"""

from __future__ import annotations

import copy
import itertools
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from splitinfer.server.errors import APIError
from splitinfer.server.generation import ChoiceEvent
from splitinfer.server.responses import ChoiceText, ResponseHead, ResponseWriter, Usage, now
from splitinfer.server.tool_calls import ArgumentsDelta, CallStart, ContentDelta, StreamEvent, ToolStreamParser


def item_id(prefix: str) -> str:
    """OpenAI's ids: a type prefix, an underscore, hex."""
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputItems:
    """A reply's output items, built in order from parsed events; each method returns the
    stream events (without `sequence_number`) its change makes."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self._open: dict | None = None  # the item still being written

    def apply(self, events: list[StreamEvent]) -> list[dict]:
        out: list[dict] = []
        for event in events:
            if isinstance(event, ContentDelta):
                out += self._text(event.text)
            elif isinstance(event, CallStart):
                out += self._call(event.id, event.name)
            elif isinstance(event, ArgumentsDelta):
                out += self._arguments(event.text)
        return out

    def close(self, status: str) -> list[dict]:
        """End the open item (if any) with `status`: "completed", or "incomplete" when cut short."""
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = status
        where = self._where(item)
        if item["type"] == "message":
            part = item["content"][0]
            done = [
                {
                    "type": "response.output_text.done",
                    **where,
                    "content_index": 0,
                    "text": part["text"],
                    "logprobs": [],
                },
                {"type": "response.content_part.done", **where, "content_index": 0, "part": copy.deepcopy(part)},
            ]
        else:
            done = [
                {
                    "type": "response.function_call_arguments.done",
                    **where,
                    "name": item["name"],
                    "arguments": item["arguments"],
                }
            ]
        return [*done, self._item_event("response.output_item.done", item)]

    def _text(self, text: str) -> list[dict]:
        if not text:
            return []
        out = []
        if self._open is None or self._open["type"] != "message":
            out += self.close("completed")
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item = {"type": "message", "id": item_id("msg"), "status": "in_progress", "role": "assistant"}
            out.append(self._add({**item, "content": []}))
            self._open["content"].append(part)
            out.append(
                {
                    "type": "response.content_part.added",
                    **self._where(self._open),
                    "content_index": 0,
                    "part": copy.deepcopy(part),
                }
            )
        self._open["content"][0]["text"] += text
        where = self._where(self._open)
        out.append({"type": "response.output_text.delta", **where, "content_index": 0, "delta": text, "logprobs": []})
        return out

    def _call(self, call_id: str, name: str) -> list[dict]:
        out = self.close("completed")
        item = {
            "type": "function_call",
            "id": item_id("fc"),
            "call_id": call_id,
            "name": name,
            "arguments": "",
            "status": "in_progress",
        }
        out.append(self._add(item))
        return out

    def _arguments(self, text: str) -> list[dict]:
        if self._open is None or self._open["type"] != "function_call" or not text:
            return []
        self._open["arguments"] += text
        return [{"type": "response.function_call_arguments.delta", **self._where(self._open), "delta": text}]

    def _add(self, item: dict) -> dict:
        self.items.append(item)
        self._open = item
        return self._item_event("response.output_item.added", item)

    def _item_event(self, kind: str, item: dict) -> dict:
        return {"type": kind, "output_index": self.items.index(item), "item": copy.deepcopy(item)}

    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.items.index(item)}


def _status(finish_reason: str | None) -> str:
    """An item's and the response's status: cut by max_output_tokens is "incomplete"."""
    return "incomplete" if finish_reason == "length" else "completed"


def usage_body(usage: Usage) -> dict:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


@dataclass(frozen=True)
class ResponsesAPIFormat(ResponseWriter):
    """The Responses API's objects for one request (one choice: the API has no `n`).

    `echoed`: the request's settings, which every response object repeats; `tool_parser`: a
    parser per reply when tool calls are parsed, as `ChatFormat` takes it."""

    echoed: dict[str, Any]
    tool_parser: Callable[[], ToolStreamParser] | None = None
    _sequence: Iterator[int] = field(default_factory=itertools.count)

    prompt_param = "input"
    ends_with_done = False

    def head(self, model: str) -> ResponseHead:
        return ResponseHead(item_id("resp"), model, now())

    def body(self, head: ResponseHead, choices: list[ChoiceText], usage: Usage) -> dict:
        [choice] = choices
        builder = OutputItems()
        builder.apply(self._parsed(self._new_parser(), choice.text, final=True))
        builder.close(_status(choice.finish_reason))
        return self._response(head, _status(choice.finish_reason), builder.items, usage)

    async def chunks(
        self, head: ResponseHead, events: AsyncIterator[ChoiceEvent], usage: Usage
    ) -> AsyncGenerator[dict, None]:
        yield self._event({"type": "response.created", "response": self._response(head, "in_progress", [], None)})
        yield self._event({"type": "response.in_progress", "response": self._response(head, "in_progress", [], None)})
        builder, parser, status = OutputItems(), self._new_parser(), "completed"
        async for event in events:
            usage.add(event)
            changes = builder.apply(self._parsed(parser, event.text, final=event.finish_reason is not None))
            if event.finish_reason is not None:
                status = _status(event.finish_reason)
                changes += builder.close(status)
            for change in changes:
                yield self._event(change)
        final = self._response(head, status, builder.items, usage)
        yield self._event({"type": f"response.{status}", "response": final})

    def sse(self, chunk: dict) -> dict:
        return {"event": chunk["type"], "data": json.dumps(chunk)}

    def error_chunk(self, error: APIError) -> dict:
        return self._event({"type": "error", "code": error.code, "message": error.message, "param": error.param})

    def _event(self, event: dict) -> dict:
        return {**event, "sequence_number": next(self._sequence)}

    def _new_parser(self) -> ToolStreamParser | None:
        return self.tool_parser() if self.tool_parser is not None else None

    @staticmethod
    def _parsed(parser: ToolStreamParser | None, text: str, final: bool) -> list[StreamEvent]:
        if parser is None:
            return [ContentDelta(text)] if text else []
        return parser.feed(text) + (parser.finish() if final else [])

    def _response(self, head: ResponseHead, status: str, output: list[dict], usage: Usage | None) -> dict:
        return {
            "id": head.id,
            "object": "response",
            "created_at": head.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": head.model,
            "output": copy.deepcopy(output),
            **self.echoed,
            "usage": usage_body(usage) if usage is not None else None,
        }
