"""Request bodies as strict JSON: whatever the bytes, a dict the server can carry or a 400."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitinfer.server.errors import APIError
from splitinfer.server.json_body import MAX_DEPTH, json_path, parse_json_object

characters = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = st.text(characters, max_size=6)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)


def has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_lone_surrogate(v) for v in value)
    return False


def has_non_finite(value: object) -> bool:
    if isinstance(value, float):
        return value != value or value in (float("inf"), float("-inf"))
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(has_non_finite(v) for v in value)
    return False


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(st.dictionaries(texts, values, max_size=4), st.booleans())
def test_any_json_object_is_accepted_exactly_when_it_is_strict_json_and_unicode(body: dict, raw_utf8: bool) -> None:
    # Non-ASCII as raw UTF-8 or as escapes; a lone surrogate can only be an escape.
    text = json.dumps(body, ensure_ascii=not raw_utf8 or has_lone_surrogate(body))
    try:
        parsed = parse_json_object(text.encode("utf-8"))
    except APIError as exc:
        assert exc.status == 400 and exc.code in ("invalid_json", "invalid_value")
        assert has_lone_surrogate(body) or has_non_finite(body)
        json.dumps(exc.body()).encode("utf-8")  # the error itself can always be sent
    else:
        assert not has_lone_surrogate(body) and not has_non_finite(body)
        assert parsed == body


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b'{"a": 1', b"[]", b"null", b'"x"', b"", b"\x00"])
def test_bytes_that_are_not_a_json_object_are_a_400(raw: bytes) -> None:
    with pytest.raises(APIError) as refused:
        parse_json_object(raw)
    assert refused.value.status == 400


def test_depth_is_limited_and_named() -> None:
    ok = '{"a": ' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}"
    assert parse_json_object(ok.encode())
    deep = '{"a": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}"
    with pytest.raises(APIError, match="nested too deeply") as refused:
        parse_json_object(deep.encode())
    assert refused.value.param.startswith("a[0][0]")


def test_json_path_writes_keys_and_indexes_and_escapes_lone_surrogates() -> None:
    assert json_path(("messages", 0, "content", 2, "text")) == "messages[0].content[2].text"
    assert json_path(("caf\u00e9", "\udcff")) == "caf\u00e9.\\udcff"
    assert json_path(()) == ""


def test_the_walk_holds_a_frame_per_level_not_per_item() -> None:
    # 200,000 strings 100 levels down, and 500,000 empty lists: a frame (and path) per item
    # took hundreds of megabytes for a body of a few.
    import tracemalloc

    from splitinfer.server.json_body import check_values

    bodies = [
        {"a": json.loads("[" * 99 + ",".join(['"\\u00e9"'] * 200_000) + "]" * 99)},
        {"a": [[] for _ in range(500_000)]},
    ]
    for body in bodies:
        tracemalloc.start()
        check_values(body)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 1_000_000, f"the walk took {peak / 1e6:.1f} MB"
