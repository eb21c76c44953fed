"""The model as the connected engine describes it, and what it asks of a request.

The server holds no checkpoint: the model's name, context length, vocabulary, tokenizer
files and chat template all arrive in the engine's `HelloReply`. A `ModelContext` is built
from one reply (once per engine instance) and turns a request's messages or prompts into
token ids. It checks the model's name (404) and that prompt token ids are in the vocabulary
(its own tokenizer must read them); the context length is the engine's to judge. A model
with no chat template (`ChatTemplate.for_model`) refuses chat requests with a 400 that tells
the operator what to do (`chat_template_missing`); its completions are served as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitinfer.protocol import HelloReply
from splitinfer.protocol.chat_template import ChatTemplateError
from splitinfer.protocol.tokenizer import Tokenizer
from splitinfer.server.chat_template import ChatTemplate
from splitinfer.server.errors import APIError, bad_request

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

    @classmethod
    def from_hello(cls, info: HelloReply, served_model_name: str | None) -> ModelContext:
        tokenizer = Tokenizer.from_files(info.tokenizer_files)
        template = ChatTemplate.for_model(info.chat_template, tokenizer)
        return cls(info=info, name=served_model_name or info.model_name, tokenizer=tokenizer, template=template)

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.name}'",
                param="model",
                code="model_not_found",
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

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The messages rendered with the chat template, as token ids."""
        if self.template is None:
            raise bad_request(NO_CHAT_TEMPLATE, code="chat_template_missing")
        try:
            prompt = self.template.render(messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise bad_request(str(exc), param=exc.param) from None
        return self.tokenizer.encode_chat_prompt(prompt)

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
