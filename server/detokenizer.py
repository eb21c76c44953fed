"""Token ids to streamed text: UTF-8-safe incremental decoding and OpenAI stop strings.

    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["\\n\\n"])
    for ids in engine_steps:
        send(detok.push(ids))        # only text that can no longer change
        if detok.stopped:            # a stop string appeared: abort the engine request
            break
    else:
        send(detok.finish())         # max_tokens or eos: flush what was held back

Two things hold text back.

1. Incomplete characters. A byte-level BPE token can end inside a multi-byte UTF-8
   character, and decoding it alone gives U+FFFD. The detokenizer keeps a small window of
   token ids, `[prefix_offset, read_offset)` already shown and `[read_offset, end)` new,
   and decodes it twice: the new text is what the whole window decodes to beyond what its
   shown part decodes to, and it is released only when it does not end in U+FFFD (the
   technique of vLLM and TGI). Decoding a window rather than single tokens also keeps the
   leading spaces that SentencePiece decoders strip from the first token they see. Each
   push decodes only the window, so its cost follows the new tokens, not the output so far
   (a run of tokens that keeps ending in U+FFFD, i.e. invalid bytes, stays in the window
   until a complete character follows it or `finish()`).
   For byte-level tokenizers (Llama 3) every push plus `finish()` concatenates to exactly
   `tokenizer.decode(output_ids)`.

2. Stop strings. Once the text contains a stop string, the text before it (or through it,
   with `include_stop_str_in_output`) is released and nothing after it ever. Text that could
   still become a stop string (a suffix that is a prefix of one) is held until it is known
   not to be, so no stop string ever leaks, not even in part. The stop string chosen is the
   one that completes first in the text (ties: the one that starts first), which makes the
   result independent of how the tokens were split into pushes.
"""

from __future__ import annotations

from collections.abc import Sequence

from splitinfer.protocol.tokenizer import Tokenizer

# Prompt tokens decoded in front of the first output tokens, as vLLM does: enough for a
# decoder to see that the first output token does not start the text (SentencePiece would
# drop its leading space) and to finish a character the prompt began.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class StopStringMatcher:
    """Finds OpenAI stop strings in text that arrives in pieces; see the module docstring."""

    __slots__ = ("_stops", "_include_stop", "_held", "_stop_reason")

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        """Raises ValueError naming `stop[i]` when a stop string is not a non-empty string."""
        if isinstance(stop, str):
            raise ValueError("stop must be a sequence of strings, not one string")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        self._stops = tuple(dict.fromkeys(stop))
        self._include_stop = include_stop_str_in_output
        self._held = ""
        self._stop_reason: str | None = None

    @property
    def stopped(self) -> bool:
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """The stop string that matched, or None."""
        return self._stop_reason

    def feed(self, text: str) -> str:
        """Take the next piece of text; return what can be released now."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        # Everything before _held is released and holds no start of a stop string, so a
        # match can only lie within _held + text.
        window = self._held + text
        match = _earliest_completed_stop(window, self._stops)
        if match is not None:
            start, stop = match
            self._held, self._stop_reason = "", stop
            return window[: start + len(stop) if self._include_stop else start]
        keep = _partial_stop_start(window, self._stops)
        self._held = window[keep:]
        return window[:keep]

    def flush(self) -> str:
        """Release the held text: the text has ended, so it cannot become a stop string."""
        held, self._held = self._held, ""
        return held


class IncrementalDetokenizer:
    """The text of one request's output, released token by token; see the module docstring."""

    __slots__ = ("_tokenizer", "_skip_special", "_keep", "_ids", "_read", "_prefix_text", "_stops", "_finished")

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] | None,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        keep_special: frozenset[int] = frozenset(),
    ) -> None:
        """`prompt_token_ids` gives the first output tokens their context (None: no context);
        `keep_special`: special tokens written out all the same (a tool-call format's markers,
        which its parser reads). Raises ValueError naming `stop[i]` for an empty or non-string
        stop string."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._keep = keep_special
        self._stops = StopStringMatcher(stop, include_stop_str_in_output)
        self._finished = False
        # _ids is the window: [0, _read) already released, [_read, end) not yet. (vLLM's
        # prefix_offset is always 0 here: the tokens before it are dropped when it moves.)
        self._ids: list[int] = []
        self._read = 0
        self._prefix_text: str | None = None  # decode(_ids[:_read]), None until computed
        if prompt_token_ids:
            tail = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
            # A prompt ending inside a character would make the output's first characters
            # depend on the prompt; without the context the output decodes on its own.
            if not self._decode(tail).endswith(REPLACEMENT_CHAR):
                self._ids, self._read = tail, len(tail)

    @property
    def stopped(self) -> bool:
        """True once a stop string appeared; later tokens add no text."""
        return self._stops.stopped

    @property
    def stop_reason(self) -> str | None:
        """The stop string that matched, or None."""
        return self._stops.stop_reason

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Add the tokens of one engine step; return the text they finalised (often "")."""
        if self._finished:
            raise RuntimeError("push() after finish(): the request's text is already complete")
        if self.stopped or not new_token_ids:
            return ""
        self._ids.extend(new_token_ids)
        return self._stops.feed(self._release(final=False))

    def finish(self) -> str:
        """End of the output (eos, max_tokens): return everything still held back, an
        incomplete character as U+FFFD included. Returns "" after a stop string or when
        called again."""
        if self._finished or self.stopped:
            self._finished = True
            return ""
        self._finished = True
        text = self._stops.feed(self._release(final=True))
        return text if self.stopped else text + self._stops.flush()

    def _release(self, final: bool) -> str:
        """Text of the window's unreleased tokens, or "" while it may end inside a character."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[: self._read])
        prefix_text = self._prefix_text
        full_text = self._decode(self._ids)
        if len(full_text) <= len(prefix_text):
            return ""  # nothing new, e.g. a skipped special token: keep it in the window
        if not final and full_text.endswith(REPLACEMENT_CHAR):
            return ""  # maybe an unfinished character: look again when more tokens arrive
        # Slide: the released tokens become the context of the next window, and everything
        # before them is dropped, so the window stays a few tokens long.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = None
        return full_text[len(prefix_text) :]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special, keep=self._keep)


def _earliest_completed_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(start, stop string) of the match that ends first in text (ties: starts first), or None."""
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for stop in stops:
        start = text.find(stop)  # the first occurrence of a string is also the first to end
        if start >= 0:
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
    return None if best is None else (best[1], best[2])


def _partial_stop_start(text: str, stops: Sequence[str]) -> int:
    """The smallest i such that text[i:] is a proper prefix of a stop string; len(text) if none."""
    best = len(text)
    for stop in stops:
        # Only suffixes shorter than the stop string can be a proper prefix of it.
        i = text.find(stop[0], max(0, len(text) - len(stop) + 1), best)
        while i >= 0:
            if stop.startswith(text[i:]):
                best = i
                break
            i = text.find(stop[0], i + 1, best)
    return best
