"""Drive a running splitinfer server with the third-party clients that speak the Responses
API: the OpenAI Agents SDK, langchain's ChatOpenAI(use_responses_api=True) and pydantic-ai's
OpenAIResponsesModel. Each does what its users do first: a plain reply, a stream, a
required tool call, a typed (JSON schema) answer.

These clients are not test dependencies; install them beside the server's environment:

    python -m venv /tmp/clients
    /tmp/clients/bin/pip install openai-agents langchain-openai 'pydantic-ai-slim[openai]'
    /tmp/clients/bin/python scripts/check_clients.py --base-url http://127.0.0.1:8000/v1 --model M

Works with random tiny checkpoints: replies that must end (tool calls, typed answers) are
enforced by grammars, and plain text is limited by max_tokens. Exits 1 if any client fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from collections.abc import Callable

from pydantic import BaseModel, Field


class City(BaseModel):
    name: str = Field(max_length=10)
    population: int


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}"


def agents_sdk(base_url: str, model_name: str) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)

    def model() -> OpenAIResponsesModel:  # one client per event loop
        return OpenAIResponsesModel(model=model_name, openai_client=AsyncOpenAI(base_url=base_url, api_key="x"))

    settings = ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=300, temperature=0)
    caller = Agent(
        name="caller",
        instructions="Use the tool.",
        model=model(),
        tools=[function_tool(get_weather)],
        model_settings=settings,
        tool_use_behavior="stop_on_first_tool",
    )
    result = asyncio.run(Runner.run(caller, "Weather in Oslo?", max_turns=2))
    assert str(result.final_output).startswith("Sunny in "), result.final_output
    print(f"agents: the tool ran; final output {str(result.final_output)[:40]!r}")

    typed = Agent(name="typed", model=model(), output_type=City, model_settings=ModelSettings(max_tokens=200))

    async def streamed() -> tuple[object, int]:
        run = Runner.run_streamed(typed, "Name a city.")
        count = sum([1 async for _ in run.stream_events()])
        return run.final_output, count

    output, count = asyncio.run(streamed())
    assert isinstance(output, City), output
    print(f"agents: streamed {count} events into {output!r}")


def langchain(base_url: str, model_name: str) -> None:
    from langchain_openai import ChatOpenAI

    def llm(max_tokens: int) -> ChatOpenAI:
        return ChatOpenAI(
            model=model_name, base_url=base_url, api_key="x", use_responses_api=True, max_tokens=max_tokens
        )

    message = llm(16).invoke("Hello there")
    assert message.usage_metadata["output_tokens"] == 16, message.usage_metadata
    chunks = list(llm(16).stream("Hello there"))
    assert "".join(chunk.text for chunk in chunks), chunks
    tooled = llm(300).bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False)
    [call] = tooled.invoke("Weather in Oslo?").tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str), call
    typed = llm(200).with_structured_output(City, method="json_schema").invoke("Name a city.")
    assert isinstance(typed, City), typed
    print(f"langchain: invoke, {len(chunks)} streamed chunks, a tool call, {typed!r}")


def pydantic_ai(base_url: str, model_name: str) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIResponsesModel(model_name, provider=OpenAIProvider(base_url=base_url, api_key="x"))
    text = Agent(model, model_settings={"max_tokens": 24}).run_sync("Hello").output
    assert isinstance(text, str) and text, text
    typed = Agent(model, output_type=City, model_settings={"max_tokens": 200}).run_sync("Name a city.").output
    assert isinstance(typed, City), typed
    print(f"pydantic-ai: text, then {typed!r}")


CLIENTS: dict[str, Callable[[str, str], None]] = {
    "agents": agents_sdk,
    "langchain": langchain,
    "pydantic-ai": pydantic_ai,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="The server's /v1 URL.")
    parser.add_argument("--model", required=True, help="The served model's name.")
    parser.add_argument("clients", nargs="*", metavar="CLIENT", help=f"Some of {', '.join(CLIENTS)} (default: all).")
    args = parser.parse_args()
    unknown = set(args.clients) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown clients: {', '.join(sorted(unknown))}")
    failed = []
    for name in args.clients or CLIENTS:
        try:
            CLIENTS[name](args.base_url, args.model)
        except Exception:
            traceback.print_exc()
            failed.append(name)
    print("failed: " + ", ".join(failed) if failed else "all clients passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
