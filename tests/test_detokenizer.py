"""Incremental detokenization: no broken characters, no leaked stop strings, any chunking.

Most tests use a byte-level BPE trained here on accented, CJK and emoji text, so that many
tokens end inside a multi-byte UTF-8 character (and random token sequences are full of
invalid bytes); the tiny checkpoint's tokenizer covers the Llama 3 special tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from splitinfer.protocol.tokenizer import Tokenizer
from splitinfer.server.detokenizer import IncrementalDetokenizer, StopStringMatcher

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=1000)
CORPUS = [
    "café crème brûlée naïve façade",
    "中文 汉字 你好 世界 中国",
    "😀 😃 🎉 👍🏽 emoji ok",
    "plain ascii words here",
    "Ελληνικά русский عربى",
]
SPECIALS = ["<|s|>", "<|eot|>"]


@functools.cache
def multibyte_tokenizer() -> Tokenizer:
    """A byte-level BPE whose merges cut through multi-byte characters ('ĳįðŁ' ends one emoji
    and starts the next), with two special tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return Tokenizer.from_files({"tokenizer.json": tok.to_str().encode()})


def chunks(ids: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """Split ids into pushes of the given sizes (cycled; 0 is an empty push)."""
    if not any(sizes):
        sizes = [len(ids)]  # all empty pushes would never get through the ids
    out, i, k = [], 0, 0
    while i < len(ids):
        size = sizes[k % len(sizes)]
        out.append(list(ids[i : i + size]))
        i, k = i + size, k + 1
    return out


def stream(detok: IncrementalDetokenizer, pushes: Sequence[Sequence[int]]) -> list[str]:
    """Every piece of text the detokenizer releases, finish() last unless a stop string matched."""
    pieces = [detok.push(p) for p in pushes]
    if not detok.stopped:
        pieces.append(detok.finish())
    return pieces


def first_stop(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Reference: scan the text a character at a time and stop at the first position where a
    stop string ends (the longest one if several end there)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[:end] if include else text[: end - len(stop)], stop
    return text, None


token_ids = st.lists(st.integers(0, multibyte_tokenizer().vocab_size - 1), max_size=40)
push_sizes = st.lists(st.integers(0, 6), min_size=1, max_size=8)


# UTF-8 safety -------------------------------------------------------------------------------


@FUZZ
@given(ids=token_ids, sizes=push_sizes, skip_special=st.booleans(), prompt=st.none() | token_ids)
def test_pushes_concatenate_to_the_full_decode_for_any_chunking(
    ids: list[int], sizes: list[int], skip_special: bool, prompt: list[int] | None
) -> None:
    tokenizer = multibyte_tokenizer()
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special)
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special)
    released = ""
    for push in chunks(ids, sizes):
        released += detok.push(push)
        # Released text is final: the rest of the stream only ever appends to it.
        assert expected.startswith(released)
    assert released + detok.finish() == expected


SPLIT_CHARACTERS = ["中国人 你", "👍🏽 🎉 ok", "brûlée naïve", "русский язык", "ü ß 中 😃👍"]


@pytest.mark.parametrize("text", SPLIT_CHARACTERS)
def test_a_character_split_across_tokens_is_released_only_when_complete(text: str) -> None:
    tokenizer = multibyte_tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the case under test really occurs
    detok = IncrementalDetokenizer(tokenizer, None)
    pieces = [detok.push([i]) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + detok.finish() == text


def test_finish_releases_an_unfinished_character_as_replacement() -> None:
    tokenizer = multibyte_tokenizer()
    first, _ = tokenizer.encode("中", add_special_tokens=False)  # two tokens, split inside the character
    detok = IncrementalDetokenizer(tokenizer, None)
    assert detok.push([first]) == ""
    assert detok.finish() == "\ufffd"


def test_prompt_context_carries_over_to_the_first_output_tokens(tiny_checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_files({"tokenizer.json": (tiny_checkpoint / "tokenizer.json").read_bytes()})
    prompt = tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=True)
    output = tokenizer.encode(" Bonjour ! Café ? 中文 😀<|eot_id|>", add_special_tokens=False)
    for skip_special in (True, False):
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special)
        pieces = stream(detok, [[i] for i in output])
        assert "".join(pieces) == tokenizer.decode(output, skip_special_tokens=skip_special)
        assert all(not piece.endswith("\ufffd") for piece in pieces)
    assert "".join(pieces).endswith("😀<|eot_id|>")


def test_a_prompt_ending_inside_a_character_does_not_leak_into_the_output() -> None:
    tokenizer = multibyte_tokenizer()
    first, second = tokenizer.encode("中", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("ok ", add_special_tokens=False) + [first])
    assert "".join(stream(detok, [[second]])) == tokenizer.decode([second])


def test_sentencepiece_leading_space_survives_with_prompt_context() -> None:
    # Llama 2's decoder strips the space of the first token it sees; decoding each output
    # token after a few prompt tokens keeps " Hello" a separate word from the prompt.
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.train_from_iterator(
        ["Question: what? Hello world, the answer is forty two."] * 10,
        trainers.BpeTrainer(vocab_size=120, show_progress=False),
    )
    tokenizer = Tokenizer.from_files({"tokenizer.json": tok.to_str().encode()})
    prompt = tokenizer.encode("Question: what?", add_special_tokens=False)
    output = tokenizer.encode("Hello world", add_special_tokens=False)
    assert "".join(stream(IncrementalDetokenizer(tokenizer, prompt), [[i] for i in output])) == " Hello world"
    assert "".join(stream(IncrementalDetokenizer(tokenizer, None), [[i] for i in output])) == "Hello world"


@FUZZ
@given(ids=token_ids, sizes=push_sizes, prompt=st.none() | token_ids)
def test_kept_special_tokens_are_written_and_the_others_skipped(
    ids: list[int], sizes: list[int], prompt: list[int] | None
) -> None:
    """A tool-call format's marker tokens stay in the text its parser reads; other special
    tokens (eos) are skipped as usual, whatever the chunking."""
    tokenizer = multibyte_tokenizer()
    specials = sorted(tokenizer.special_token_ids)
    assert len(specials) == 2
    keep, skipped = frozenset(specials[:1]), specials[1]
    expected = tokenizer.decode([t for t in ids if t != skipped], skip_special_tokens=False)
    assert expected == tokenizer.decode(ids, keep=keep)
    detok = IncrementalDetokenizer(tokenizer, prompt, keep_special=keep)
    released = "".join(detok.push(push) for push in chunks(ids, sizes))
    assert released + detok.finish() == expected


class RecordingTokenizer(Tokenizer):
    """Records how many ids each decode call sees."""

    def __init__(self, inner: Tokenizer) -> None:
        super().__init__(inner._tokenizer)
        self.window_sizes: list[int] = []

    def decode(
        self, token_ids: Sequence[int], skip_special_tokens: bool = True, keep: frozenset[int] = frozenset()
    ) -> str:
        self.window_sizes.append(len(token_ids))
        return super().decode(token_ids, skip_special_tokens, keep)


def test_each_push_decodes_a_short_window_not_the_whole_output() -> None:
    tokenizer = RecordingTokenizer(multibyte_tokenizer())
    # Words outside the training text, so unfinished characters keep some windows open.
    ids = tokenizer.encode(" ".join([*CORPUS, "ü ß 中 😃👍 русский язык"]) * 40, add_special_tokens=False)
    assert len(ids) > 1000
    expected = tokenizer.decode(ids)
    tokenizer.window_sizes.clear()
    detok = IncrementalDetokenizer(tokenizer, ids[:10])
    released = "".join(stream(detok, [[i] for i in ids]))
    assert released == expected
    assert max(tokenizer.window_sizes) <= 10  # a few tokens of context plus an unfinished character


# Stop strings ---------------------------------------------------------------------------------


def test_a_stop_string_spanning_tokens_never_leaks_even_in_part() -> None:
    tokenizer = multibyte_tokenizer()
    text = "plain ascii words here"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stop = "ii wo"
    assert not any(stop in tokenizer.decode([i]) for i in ids)  # no single token holds it
    detok = IncrementalDetokenizer(tokenizer, None, stop=[stop])
    released = ""
    for i in ids:
        released += detok.push([i])
        assert "plain asc".startswith(released)  # not even the "i" that starts the stop string
    assert released == "plain asc"
    assert detok.stopped and detok.stop_reason == stop
    assert detok.push(tokenizer.encode(" more", add_special_tokens=False)) == ""
    assert detok.finish() == ""


def test_a_held_partial_match_is_released_once_it_is_not_a_stop() -> None:
    tokenizer = multibyte_tokenizer()
    ids = tokenizer.encode("plain ascii words here", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, None, stop=["words there"])
    released, saw_hold = "", False
    for i in ids:
        released += detok.push([i])
        saw_hold |= released == "plain ascii "  # "words" (and "words ") is held back
    assert saw_hold
    assert released == "plain ascii words here" and not detok.stopped
    assert detok.finish() == ""


def test_finish_releases_a_partial_match_left_at_the_end() -> None:
    tokenizer = multibyte_tokenizer()
    ids = tokenizer.encode("emoji ok 😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, None, stop=["😀😃"])
    released = "".join(detok.push([i]) for i in ids)
    assert released == "emoji ok "
    assert detok.finish() == "😀"
    assert not detok.stopped and detok.stop_reason is None


def test_include_stop_str_in_output_releases_the_stop_string_too() -> None:
    tokenizer = multibyte_tokenizer()
    ids = tokenizer.encode("中文 汉字 你好 世界", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, None, stop=["你好"], include_stop_str_in_output=True)
    assert "".join(stream(detok, [ids])) == "中文 汉字 你好"
    assert detok.stop_reason == "你好"


def test_the_stop_string_that_completes_first_wins() -> None:
    matcher = StopStringMatcher(["abcde", "cd"])
    assert matcher.feed("xabcdef") == "xab" and matcher.stop_reason == "cd"
    # Two ending at the same character: the longer one, so no part of either is shown.
    matcher = StopStringMatcher(["c", "bc"])
    assert matcher.feed("abc") == "a" and matcher.stop_reason == "bc"


@pytest.mark.parametrize("stop", [["ok", ""], ["ok", 3]])
def test_an_invalid_stop_string_is_refused_naming_it(stop: list) -> None:
    with pytest.raises(ValueError, match=r"stop\[1\]"):
        IncrementalDetokenizer(multibyte_tokenizer(), None, stop=stop)


def test_push_after_finish_is_a_bug() -> None:
    detok = IncrementalDetokenizer(multibyte_tokenizer(), None)
    detok.finish()
    assert detok.finish() == ""
    with pytest.raises(RuntimeError):
        detok.push([1])


@st.composite
def stop_strings(draw: st.DrawFn, text: str) -> list[str]:
    """Up to four stop strings, mostly pieces of the text so that they match, some near misses."""

    def piece() -> str:
        if text and draw(st.booleans()):
            start = draw(st.integers(0, len(text) - 1))
            return text[start : start + draw(st.integers(1, 4))]
        return draw(st.text(alphabet="ab 中é\ufffd<|", min_size=1, max_size=3))

    return [piece() for _ in range(draw(st.integers(0, 4)))]


@FUZZ
@given(data=st.data(), ids=token_ids, sizes=push_sizes, include=st.booleans())
def test_stop_strings_give_the_same_text_for_any_chunking(
    data: st.DataObject, ids: list[int], sizes: list[int], include: bool
) -> None:
    tokenizer = multibyte_tokenizer()
    full = tokenizer.decode(ids, skip_special_tokens=False)
    stops = data.draw(stop_strings(full))
    expected, reason = first_stop(full, stops, include)
    detok = IncrementalDetokenizer(
        tokenizer, None, skip_special_tokens=False, stop=stops, include_stop_str_in_output=include
    )
    released = ""
    for push in chunks(ids, sizes):
        released += detok.push(push)
        assert expected.startswith(released)  # nothing past (or of) the stop string, ever
    if not detok.stopped:
        released += detok.finish()
    assert released == expected
    assert detok.stop_reason == reason


@FUZZ
@given(data=st.data(), text=st.text(alphabet="abc中\n", max_size=30), cuts=st.lists(st.integers(0, 30)))
def test_stop_matcher_on_text_pieces_matches_the_character_scan(
    data: st.DataObject, text: str, cuts: list[int]
) -> None:
    stops = data.draw(stop_strings(text))
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    matcher = StopStringMatcher(stops)
    released = "".join(matcher.feed(text[a:b]) for a, b in zip(bounds, bounds[1:]))
    if not matcher.stopped:
        released += matcher.flush()
    assert (released, matcher.stop_reason) == first_stop(text, stops, include=False)
