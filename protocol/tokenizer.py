"""The checkpoint's tokenizer, as the servers and the offline `LLM` both use it: built from the
tokenizer files the engine sends in `HelloReply` (`read_tokenizer_files` reads them from a
checkpoint), or from a checkpoint directory.

    tokenizer = Tokenizer.from_files(hello_reply.tokenizer_files)     # a server
    tokenizer = Tokenizer.from_dir("path/to/checkpoint")              # in-process
    ids = tokenizer.encode_chat_prompt(template.render(messages))   # the template's special tokens only
    text = tokenizer.decode(output_ids)

A thin layer over Hugging Face `tokenizers` (Rust, no torch): `tokenizer.json` is the
whole tokenizer (normalizer, pre-tokenizer, model, post-processor, decoder);
`tokenizer_config.json`, when present, adds the names of the special tokens (what chat
templates see as `bos_token`, `eos_token`, ...). Prompts encode exactly as transformers 5
encodes them for every family we load (Llama 3, Qwen2/3, Mistral): BOS or EOS is added by
tokenizer.json's post-processor or not at all. transformers 5 drops `add_bos_token` and
`add_eos_token` from tokenizer_config.json whenever a tokenizer.json exists (which it
always does here) and keeps tokenizer.json's post-processor, so those flags change
nothing here either. Streaming text out of token ids is `detokenizer.py`'s job.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
# The checkpoint files a server needs to tokenize and render chat templates by itself.
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG_JSON, "special_tokens_map.json", "generation_config.json")
# The named special tokens transformers always knows; a checkpoint may name more (`image_token`).
STANDARD_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

logger = logging.getLogger(__name__)


def read_tokenizer_files(path: str | Path) -> dict[str, bytes]:
    """The `TOKENIZER_FILES` a checkpoint directory has, by name (what `HelloReply` carries)."""
    path = Path(path)
    return {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).is_file()}


class TokenizerFilesError(ValueError):
    """The engine's tokenizer files cannot be used; the message names the file and field."""

    def __init__(self, file: str, message: str) -> None:
        super().__init__(f"{file}: {message}")
        self.file = file


@dataclass(frozen=True, slots=True)
class SpecialTokenNames:
    """What tokenizer_config.json says about special tokens: each named one ("bos_token" ->
    "<s>"), as transformers' `special_tokens_map` has them, and the `add_bos_token` hint."""

    tokens: Mapping[str, str] = field(default_factory=dict)
    add_bos_token: bool | None = None


class Tokenizer:
    """Encode prompts and decode outputs with the checkpoint's tokenizer."""

    __slots__ = ("_tokenizer", "_names", "__dict__")  # __dict__: cached properties

    def __init__(self, tokenizer: _HFTokenizer, names: SpecialTokenNames = SpecialTokenNames()) -> None:
        self._tokenizer = tokenizer
        self._names = names

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> Tokenizer:
        """Build from `HelloReply.tokenizer_files` (file name -> contents).

        Raises `TokenizerFilesError` when tokenizer.json is missing or does not load, or
        when tokenizer_config.json is not JSON or has a mistyped special-token field.
        """
        if TOKENIZER_JSON not in files:
            raise TokenizerFilesError(TOKENIZER_JSON, f"missing; the engine sent only {sorted(files)}")
        try:
            tokenizer = _HFTokenizer.from_str(files[TOKENIZER_JSON].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise TokenizerFilesError(TOKENIZER_JSON, f"not UTF-8 text ({exc})") from None
        except Exception as exc:  # tokenizers raises a bare Exception for every parse error
            raise TokenizerFilesError(TOKENIZER_JSON, f"does not load as a tokenizer: {exc}") from None
        config = files.get(TOKENIZER_CONFIG_JSON)
        return cls(tokenizer, _special_token_names(config) if config is not None else SpecialTokenNames())

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Build from a checkpoint directory's files (raises `TokenizerFilesError` as `from_files`)."""
        return cls.from_files(read_tokenizer_files(path))

    # Vocabulary ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        # tokenizers raises OverflowError for negative ids; out of range is simply unknown.
        return self._tokenizer.id_to_token(token_id) if token_id >= 0 else None

    @property
    def bos_token(self) -> str | None:
        return self._names.tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._names.tokens.get("eos_token")

    @property
    def special_tokens_map(self) -> Mapping[str, str]:
        """Every named special token ("bos_token" -> "<s>", "pad_token", a checkpoint's own
        "*_token"), as transformers' `special_tokens_map`: the variables a chat template sees."""
        return self._names.tokens

    @property
    def add_bos_token(self) -> bool | None:
        """tokenizer_config.json's hint, None when absent. Informative only: as in transformers
        5, tokenizer.json's post-processor alone decides whether BOS is added (module docstring)."""
        return self._names.add_bos_token

    # Encoding and decoding ---------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text. `add_special_tokens` runs the post-processor (Llama: prepend BOS);
        special tokens written in the text itself are recognised either way."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat_prompt(self, text: str) -> list[int]:
        """Token ids of a rendered chat template: its text only, without the post-processor,
        as transformers' `apply_chat_template(..., tokenize=True)` encodes it.

        Chat templates write `{{ bos_token }}` themselves where the model wants it, so the
        post-processor would put a second BOS in front. Guessing instead from whether the text
        starts with BOS (as this did before) differs from transformers for a template that
        writes no BOS, e.g. a --chat-template without one on a Llama or Mistral tokenizer,
        which would get a BOS it did not ask for.
        """
        return self.encode(text, add_special_tokens=False)

    def decode(
        self, token_ids: Sequence[int], skip_special_tokens: bool = True, keep: frozenset[int] = frozenset()
    ) -> str:
        """Text of token ids. Ids unknown to the vocabulary decode to nothing; an incomplete
        UTF-8 character at either end decodes to U+FFFD. `keep`: special tokens written out
        even though `skip_special_tokens` skips the others (a tool-call format's markers)."""
        if keep and skip_special_tokens:
            hidden = self.special_token_ids - keep
            return self._tokenizer.decode([t for t in token_ids if t not in hidden], skip_special_tokens=False)
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (the ones `skip_special_tokens` skips)."""
        return frozenset(i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special)


def json_object(raw: bytes) -> dict:
    try:
        config = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise TokenizerFilesError(TOKENIZER_CONFIG_JSON, f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise TokenizerFilesError(TOKENIZER_CONFIG_JSON, f"must hold a JSON object, got {type(config).__name__}")
    return config


def _special_token_names(raw: bytes) -> SpecialTokenNames:
    config = json_object(raw)
    add_bos = config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise TokenizerFilesError(TOKENIZER_CONFIG_JSON, f"add_bos_token must be true or false, got {add_bos!r}")
    names = [key for key in config if key.endswith("_token")]
    tokens = {key: token for key in names if (token := _token_name(config, key)) is not None}
    return SpecialTokenNames(tokens=tokens, add_bos_token=add_bos)


def _token_name(config: dict, key: str) -> str | None:
    # transformers writes a special token either as its string or as a serialised AddedToken.
    # It refuses any other value of a standard name, and does not take one of another
    # `*_token` key (such as `add_bos_token`) as a token.
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    if key in STANDARD_SPECIAL_TOKENS:
        raise TokenizerFilesError(TOKENIZER_CONFIG_JSON, f"{key} must be a string or an AddedToken, got {value!r}")
    return None
