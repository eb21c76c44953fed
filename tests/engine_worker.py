"""A client process for the engine-process tests: connects with `EngineClient`, streams the
requests given as JSON on stdin, and prints one JSON line per finished request.

    python tests/engine_worker.py ADDRESS CLIENT_ID < requests.json

Each request is {"id", "prompt", "max_tokens"} (greedy, ignore_eos). It prints
{"event": "connected", "pid", "engine_id"} first, {"event": "streaming"} once every request
has produced a token (so a test knows when to kill it mid-generation), then
{"event": "done", "id", "tokens", "finish_reason"} per request.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from splitinfer.protocol import SamplingParams
from splitinfer.server.engine_client import EngineClient


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def main(address: str, client_id: str, requests: list[dict]) -> None:
    client = EngineClient(address, client_id=client_id)
    info = await client.start()
    emit(event="connected", pid=os.getpid(), engine_id=info.engine_id)
    started = asyncio.Event()
    first_tokens: set[str] = set()

    async def run(request: dict) -> None:
        tokens: list[int] = []
        params = SamplingParams(max_tokens=request["max_tokens"], temperature=0.0, ignore_eos=True)
        async for out in client.generate(request["id"], request["prompt"], params):
            tokens += out.new_token_ids
            first_tokens.add(request["id"])
            if len(first_tokens) == len(requests):
                started.set()
            finish = out.finish_reason
        emit(event="done", id=request["id"], tokens=tokens, finish_reason=finish)

    async def announce() -> None:
        await started.wait()
        emit(event="streaming")

    announcer = asyncio.create_task(announce())
    await asyncio.gather(*(run(r) for r in requests))
    announcer.cancel()
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], json.load(sys.stdin)))
