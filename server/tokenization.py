"""vLLM's tokenizer endpoints, with its request and response shapes, so tools written for
vLLM count tokens through us without loading a tokenizer themselves.

- `POST /tokenize`: `{"prompt": text, "add_special_tokens": true}` encodes text as a
  completion prompt is encoded; `{"messages": [...], "tools", "add_generation_prompt",
  "continue_final_message", "add_special_tokens": false}` renders chat messages exactly as
  /v1/chat/completions does (`ModelContext.chat_prompt`, the same validation), so the ids are
  the ones a chat request with those fields sends to the engine. Either answers
  `{"count", "max_model_len", "tokens", "token_strs"}`; `token_strs` (each id's vocabulary
  entry) only with `return_token_strs`, else null.
- `POST /detokenize`: `{"tokens": [...]}` -> `{"prompt": text}`, special tokens written out,
  so it inverts /tokenize.
- `GET /tokenizer_info`: the checkpoint's tokenizer_config.json with `tokenizer_class` and
  the chat template served. Off unless the server runs with --enable-tokenizer-info-endpoint,
  as in vLLM: it shows the operator's template and configuration to every client.

`model` is optional in each body (vLLM's) while the server serves one model; with several
it picks the model (for /tokenizer_info, the `model` query parameter).
"""

from __future__ import annotations

from splitinfer.protocol.tokenizer import TOKENIZER_CONFIG_JSON, json_object
from splitinfer.server.errors import bad_request
from splitinfer.server.model_context import ModelContext
from splitinfer.server.openai_params import parse_messages, parse_prompt_options, typed_field
from splitinfer.server.tool_request import parse_tools

DEFAULT_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # what transformers loads from a tokenizer.json


def tokenize(ctx: ModelContext, body: dict) -> dict:
    return_strs = typed_field(body, "return_token_strs", bool, "a boolean", False)
    if "messages" in body and "prompt" in body:
        raise bad_request("send either 'prompt' (text) or 'messages' (a chat), not both", param="prompt")
    if "messages" in body:
        ids = _chat_ids(ctx, body)
    else:
        ids = _text_ids(ctx, body)
    return {
        "count": len(ids),
        "max_model_len": ctx.info.max_model_len,
        "tokens": ids,
        "token_strs": [ctx.tokenizer.id_to_token(i) for i in ids] if return_strs else None,
    }


def detokenize(ctx: ModelContext, body: dict) -> dict:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise bad_request("'tokens' must be a list of token ids", param="tokens")
    vocab = ctx.info.vocab_size
    for i, token in enumerate(tokens):
        if not 0 <= token < vocab:
            raise bad_request(f"'tokens[{i}]' is not a token id in [0, {vocab})", param="tokens")
    return {"prompt": ctx.tokenizer.decode(tokens, skip_special_tokens=False)}


def tokenizer_info(ctx: ModelContext) -> dict:
    raw = ctx.info.tokenizer_files.get(TOKENIZER_CONFIG_JSON)
    config = json_object(raw) if raw is not None else {}
    info = {"tokenizer_class": config.get("tokenizer_class") or DEFAULT_TOKENIZER_CLASS, **config}
    if ctx.template is not None:
        info["chat_template"] = ctx.template.source
    return info


def _chat_ids(ctx: ModelContext, body: dict) -> list[int]:
    tools = parse_tools(body)
    return ctx.chat_prompt(parse_messages(body), tools.template_tools if tools else None, parse_prompt_options(body))


def _text_ids(ctx: ModelContext, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (or send 'messages' to tokenize a chat)", param="prompt")
    add_special = typed_field(body, "add_special_tokens", bool, "a boolean", True)
    return ctx.tokenizer.encode(prompt, add_special_tokens=add_special)


def requested_model(body: dict) -> str | None:
    """The request's `model`, optional here (vLLM's): None picks the server's only model."""
    return typed_field(body, "model", str, "a string")
