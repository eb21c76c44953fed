"""The checkpoint's tokenizer (`tokenizer.json`, Hugging Face `tokenizers` format)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from splitinfer.engine.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """Text to token ids and back. Special tokens (BOS) are added as the checkpoint's post-processor says."""

    def __init__(self, tokenizer: _HFTokenizer) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        file = Path(path) / TOKENIZER_FILE
        if not file.is_file():
            raise CheckpointError(file, "file is missing; pass prompts as token ids or add the tokenizer")
        try:
            return cls(_HFTokenizer.from_file(str(file)))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(file, f"is not a valid tokenizer file: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
