"""vLLM's tokenizer endpoints over real processes: /tokenize of chat messages gives the ids a
chat request with the same fields sends to the engine (read back through its prompt logprobs),
/tokenize of text gives transformers' ids, /detokenize inverts both, /tokenizer_info only when
the operator enables it, and bad input is a 400 naming the field. One engine (Qwen2: ChatML
with tools, no BOS) behind two servers, one of them with --enable-tokenizer-info-endpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import FAMILIES
from procs import free_port, start_engine, start_server, stop

MODEL = "tiny"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo? 中文"}]


@dataclass(frozen=True)
class Served:
    http: httpx.Client  # the server without /tokenizer_info
    info_http: httpx.Client  # the server with it
    checkpoint: Path


@pytest.fixture(scope="module")
def served(make_checkpoint, tmp_path_factory) -> Iterator[Served]:
    path: Path = make_checkpoint(*FAMILIES["qwen2"])
    tmp = tmp_path_factory.mktemp("tokenize")
    address = f"ipc://{tmp}/engine.sock"
    engine = start_engine(path, address, tmp / "engine.log")
    servers = []
    try:
        ports = [free_port(), free_port()]
        servers.append(start_server(address, ports[0], tmp / "server.log", "--served-model-name", MODEL))
        servers.append(
            start_server(
                address,
                ports[1],
                tmp / "info-server.log",
                "--served-model-name",
                MODEL,
                "--enable-tokenizer-info-endpoint",
            )
        )
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{ports[0]}", timeout=60) as http,
            httpx.Client(base_url=f"http://127.0.0.1:{ports[1]}", timeout=60) as info_http,
        ):
            yield Served(http, info_http, path)
    finally:
        for server in servers:
            stop(server)
        stop(engine)


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def engine_prompt_ids(http: httpx.Client, **fields: object) -> tuple[list[int], int]:
    """The prompt ids a chat request sent to the engine, read back through vLLM's prompt_logprobs
    (each entry is keyed by its prompt token; the first token has none), and its usage count."""
    body = {"model": MODEL, "max_tokens": 1, "prompt_logprobs": 0, **fields}
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    return [int(next(iter(entry))) for entry in out["prompt_logprobs"][1:]], out["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": CHAT},
        {"messages": CHAT, "tools": [WEATHER]},
        {"messages": CHAT, "tools": [WEATHER], "tool_choice": "none"},
        {
            "messages": [*CHAT, {"role": "assistant", "content": "It is"}],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
        {"messages": CHAT, "add_generation_prompt": False},
    ],
    ids=["plain", "tools", "tools-none", "continue-final", "no-generation-prompt"],
)
def test_tokenize_chat_gives_the_ids_the_chat_request_sends(served: Served, fields: dict) -> None:
    reply = served.http.post("/tokenize", json={"model": MODEL, **fields})
    assert reply.status_code == 200, reply.text
    out = reply.json()
    sent, count = engine_prompt_ids(served.http, **fields)
    assert out["tokens"][1:] == sent and out["count"] == count == len(out["tokens"])
    assert (
        out["token_strs"] is None
        and out["max_model_len"] == served.http.get("/v1/models").json()["data"][0]["max_model_len"]
    )
    # transformers renders the same conversation to the same ids.
    hf = hf_tokenizer(served.checkpoint).apply_chat_template(
        fields["messages"],
        tools=fields.get("tools"),
        add_generation_prompt=fields.get("add_generation_prompt", True),
        continue_final_message=fields.get("continue_final_message", False),
        tokenize=True,
    )
    assert out["tokens"] == hf["input_ids"]
    # /detokenize inverts it: the rendered conversation, special tokens written out.
    text = served.http.post("/detokenize", json={"model": MODEL, "tokens": out["tokens"]}).json()["prompt"]
    assert text == hf_tokenizer(served.checkpoint).apply_chat_template(
        fields["messages"],
        tools=fields.get("tools"),
        add_generation_prompt=fields.get("add_generation_prompt", True),
        continue_final_message=fields.get("continue_final_message", False),
        tokenize=False,
    )


@pytest.mark.parametrize("add_special_tokens", [True, False, None])
def test_tokenize_text_matches_transformers_and_detokenize_inverts_it(
    served: Served, add_special_tokens: bool | None
) -> None:
    text = "Hello world, 中文 and émojis 🎉 <|im_start|> too"
    body: dict = {"prompt": text, "return_token_strs": True}  # no model: optional, as in vLLM
    if add_special_tokens is not None:
        body["add_special_tokens"] = add_special_tokens
    out = served.http.post("/tokenize", json=body).json()
    hf = hf_tokenizer(served.checkpoint)
    expected = hf.encode(text, add_special_tokens=add_special_tokens is not False)
    assert out["tokens"] == expected and out["count"] == len(expected)
    assert out["token_strs"] == hf.convert_ids_to_tokens(expected)
    assert served.http.post("/detokenize", json={"tokens": expected}).json() == {"prompt": hf.decode(expected)}
    completion = served.http.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1}).json()
    if add_special_tokens is not False:
        assert completion["usage"]["prompt_tokens"] == out["count"]


def test_tokenizer_info_only_when_enabled(served: Served) -> None:
    missing = served.http.get("/tokenizer_info")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    info = served.info_http.get("/tokenizer_info")
    assert info.status_code == 200, info.text
    config = json.loads((served.checkpoint / "tokenizer_config.json").read_text())
    out = info.json()
    assert out["tokenizer_class"] == config.get("tokenizer_class", "PreTrainedTokenizerFast")
    assert out["chat_template"] == config["chat_template"]
    assert {key: out[key] for key in config if key != "chat_template"} == {
        key: value for key, value in config.items() if key != "chat_template"
    }


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
        ("/tokenize", {"prompt": "a", "return_token_strs": 1}, 400, "return_token_strs"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ("/tokenize", {"messages": CHAT, "continue_final_message": True}, 400, "continue_final_message"),
        ("/tokenize", {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),
        ("/tokenize", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools[0].function"),
        ("/tokenize", {"model": "other", "prompt": "a"}, 404, "model"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
        ("/detokenize", {"tokens": [1, True]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1, 2**70]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"model": 3, "tokens": [1]}, 400, "model"),
    ],
)
def test_bad_input_is_answered_naming_the_field(served: Served, path: str, body: dict, status: int, param: str) -> None:
    reply = served.http.post(path, json=body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param
    assert served.http.post("/tokenize", json={"prompt": "still fine"}).status_code == 200


def test_chat_completions_takes_the_same_prompt_options(served: Served) -> None:
    """continue_final_message works for generation too: the reply continues the given text."""
    messages = [*CHAT, {"role": "assistant", "content": "It is"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 1}
    both = served.http.post("/v1/chat/completions", json={**body, "continue_final_message": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"
    reply = served.http.post(
        "/v1/chat/completions", json={**body, "continue_final_message": True, "add_generation_prompt": False}
    )
    assert reply.status_code == 200, reply.text
