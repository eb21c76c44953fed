"""The model as the connected engine describes it, and what it asks of a request.

The server holds no checkpoint: the model's name, context length, vocabulary, tokenizer
files and chat template all arrive in the engine's `HelloReply`. A `ModelContext` is built
from one reply (once per engine instance) and turns a request's messages or prompts into
token ids. It checks that prompt token ids are in the vocabulary
(its own tokenizer must read them); the context length is the engine's to judge. A model
with no chat template (`ChatTemplate.for_model`) refuses chat requests with a 400 that tells
the operator what to do (`chat_template_missing`); its completions are served as usual.

The tool-call format is the server's `--tool-call-parser`, or by default the one the
checkpoint's vocabulary and chat template show (`detect_tool_call_format`); a model with
none refuses requests that want tool calls parsed (`tool_call_format_unknown`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from splitinfer.protocol import HelloReply
from splitinfer.protocol.chat_template import ChatTemplateError
from splitinfer.protocol.tokenizer import Tokenizer
from splitinfer.server.chat_template import ChatTemplate
from splitinfer.server.errors import bad_request
from splitinfer.server.tool_calls import TOOL_CALL_FORMATS, ToolCallFormat, detect_tool_call_format


def served_name(info: HelloReply, served_model_name: str | None) -> str:
    """The name clients send for an engine's model: the server's --served-model-name, else the engine's."""
    return served_model_name or info.model_name


def replica_identity(info: HelloReply) -> str:
    """A digest of what replicas of one model must share: everything a server reads from the
    HelloReply to serve it, but the engine's id and lease (`engine_pool.py`)."""
    digest = hashlib.sha256()
    for part in (
        info.model_name,
        str(info.max_model_len),
        str(info.vocab_size),
        repr(info.eos_token_ids),
        repr(info.chat_template),
        repr(info.tool_chat_template),
        str(info.block_size),
    ):
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    for name in sorted(info.tokenizer_files):
        digest.update(name.encode("utf-8", "surrogatepass") + b"\0" + info.tokenizer_files[name] + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ChatPromptOptions:
    """How messages become a prompt: vLLM's chat extensions, with transformers' defaults."""

    add_generation_prompt: bool = True  # end with the assistant's header, so the model replies
    continue_final_message: bool = False  # end inside the last message, so the model continues it
    add_special_tokens: bool = False  # run the tokenizer's post-processor too (a second BOS, usually)


NO_CHAT_TEMPLATE = (
    "this model has no chat template: its checkpoint has none (chat_template.jinja or tokenizer_config.json's "
    "chat_template) and its tokenizer is not Llama 3's, whose format could be assumed. The operator can start the "
    "engine with --chat-template FILE (or the template inline); until then use /v1/completions"
)


@dataclass(frozen=True, slots=True)
class ModelContext:
    """What one engine instance told us: built once per engine id."""

    info: HelloReply
    name: str  # the name clients must send: --served-model-name, else the engine's
    tokenizer: Tokenizer
    template: ChatTemplate | None  # None: chat requests are refused
    tool_template: ChatTemplate | None  # the checkpoint's "tool_use" template: requests with tools
    tool_format: ToolCallFormat | None  # None: tool calls cannot be parsed
    tool_markers: frozenset[int]  # special tokens the tool format writes, kept in the text for its parser
    identity: str  # what replicas of this model must share (`replica_identity`)

    @classmethod
    def from_hello(
        cls, info: HelloReply, served_model_name: str | None, tool_call_parser: str = "auto"
    ) -> ModelContext:
        """`tool_call_parser`: a `TOOL_CALL_FORMATS` name, "auto" (from the checkpoint) or "none"."""
        tokenizer = Tokenizer.from_files(info.tokenizer_files)
        template = ChatTemplate.for_model(info.chat_template, tokenizer)
        tool_template = None
        if info.tool_chat_template is not None:
            tool_template = ChatTemplate(info.tool_chat_template, tokenizer.special_tokens_map)
        if tool_call_parser == "auto":
            has = lambda token: tokenizer.token_to_id(token) is not None  # noqa: E731
            tool_call_parser = detect_tool_call_format(info.chat_template, has) or "none"
        tool_format = TOOL_CALL_FORMATS.get(tool_call_parser)
        markers = frozenset(
            token_id
            for token in (tool_format.kept_tokens if tool_format else ())
            if (token_id := tokenizer.token_to_id(token)) is not None and token_id in tokenizer.special_token_ids
        )
        return cls(
            info=info,
            name=served_name(info, served_model_name),
            tokenizer=tokenizer,
            template=template,
            tool_template=tool_template,
            tool_format=tool_format,
            tool_markers=markers,
            identity=replica_identity(info),
        )

    def card(self) -> dict:
        """The model's entry in /v1/models."""
        return {
            "id": self.name,
            "object": "model",
            "created": 0,
            "owned_by": "splitinfer",
            "max_model_len": self.info.max_model_len,
        }

    def chat_prompt(
        self, messages: list[dict], tools: list[dict] | None = None, options: ChatPromptOptions = ChatPromptOptions()
    ) -> list[int]:
        """The messages (and the request's tools) rendered with the chat template, as token ids: the
        "tool_use" template when there are tools and the checkpoint has one, as transformers picks."""
        template = self.tool_template if tools and self.tool_template is not None else self.template
        if template is None:
            raise bad_request(NO_CHAT_TEMPLATE, code="chat_template_missing")
        try:
            prompt = template.render(
                messages,
                add_generation_prompt=options.add_generation_prompt,
                tools=tools,
                continue_final_message=options.continue_final_message,
            )
        except ChatTemplateError as exc:
            raise bad_request(str(exc), param=exc.param) from None
        if options.add_special_tokens:
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return self.tokenizer.encode_chat_prompt(prompt)

    def require_tool_format(self) -> ToolCallFormat:
        """The model's tool-call format; a 400 saying what to do when it has none."""
        if self.tool_format is None:
            raise bad_request(
                "this server does not know how this model writes tool calls: its checkpoint shows none of the "
                "supported formats (" + ", ".join(TOOL_CALL_FORMATS) + "). The operator can start the server with "
                "--tool-call-parser NAME; until then send tool_choice 'none' or no tools",
                param="tools",
                code="tool_call_format_unknown",
            )
        return self.tool_format

    def completion_prompts(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Each prompt as token ids (text is encoded). Ids outside the vocabulary are refused
        here too, for the server's own sake: its detokenizer reads the prompt's last tokens."""
        out = []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise bad_request(f"prompt {i} is empty", param="prompt")
            if any(not 0 <= t < self.info.vocab_size for t in ids):
                raise bad_request(f"prompt {i} has a token id outside [0, {self.info.vocab_size})", param="prompt")
            out.append(ids)
        return out

    def max_tokens(self, prompt_len: int, requested: int | None) -> int:
        """The tokens a choice may generate: `requested`, else whatever the context leaves (at
        least 1: a prompt that fills the context is the engine's to refuse, as too long)."""
        if requested is not None:
            return requested
        return max(self.info.max_model_len - prompt_len, 1)
