"""The router's choices (`server/router.py`) and the pool's engine list, without processes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitinfer.server.__main__ import EngineEntry, build_parser, engine_entries, main
from splitinfer.server.router import (
    AFFINITY_SLACK_REQUESTS,
    Candidate,
    PrefixIndex,
    Router,
    prefix_hashes,
)

BLOCK = 4


def test_prefix_hashes_are_chained_over_whole_blocks() -> None:
    a = prefix_hashes(list(range(10)), BLOCK)
    b = prefix_hashes([*range(8), 99, 99], BLOCK)
    c = prefix_hashes([0, *range(1, 10)][::-1], BLOCK)
    assert len(a) == 2 and a == b  # the partial third block does not count
    assert a[0] != c[0] and a[1] != c[1]
    # Same second block after a different first one: a different chained hash.
    assert prefix_hashes([9, 9, 9, 9, 4, 5, 6, 7], BLOCK)[1] != a[1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=12), min_size=1, max_size=20))
def test_the_index_matches_the_longest_prefix_each_replica_was_sent(prompts: list[list[int]]) -> None:
    index = PrefixIndex()
    sent: dict[str, list[list[int]]] = {}
    for i, prompt in enumerate(prompts):
        replica = f"r{i % 3}"
        index.insert(prefix_hashes(prompt, BLOCK), replica)
        sent.setdefault(replica, []).append(prompt)
    probe = prompts[-1] + [1, 2, 3, 4]
    matched = index.matches(prefix_hashes(probe, BLOCK))
    for replica, history in sent.items():
        expected = max(common_blocks(probe, p) for p in history)
        assert matched.get(replica, 0) == expected


def common_blocks(a: list[int], b: list[int]) -> int:
    n = 0
    while (n + 1) * BLOCK <= min(len(a), len(b)) and a[: (n + 1) * BLOCK] == b[: (n + 1) * BLOCK]:
        n += 1
    return n


def test_the_index_forgets_the_oldest_past_its_bound() -> None:
    index = PrefixIndex(max_entries=4)
    index.insert(prefix_hashes([1] * 8, BLOCK), "a")
    index.insert(prefix_hashes([2] * 12, BLOCK), "b")
    assert len(index) == 4
    assert index.matches(prefix_hashes([1] * 8, BLOCK)) == {}  # the oldest went first
    assert index.matches(prefix_hashes([2] * 12, BLOCK)) == {"b": 3}


def test_equal_replicas_without_a_useful_match_take_turns() -> None:
    router = Router()
    picks = [router.choose([Candidate("a", 0, 0.0), Candidate("b", 0, 0.0)], [i] * 3, BLOCK) for i in range(6)]
    assert picks.count("a") == picks.count("b") == 3


def test_the_least_loaded_replica_wins_without_affinity() -> None:
    router = Router(affinity=False)
    prompt = list(range(64))
    candidates = [Candidate("a", 5, 0.0), Candidate("b", 2, 0.0), Candidate("c", 9, 0.0)]
    assert {router.choose(candidates, prompt, BLOCK) for _ in range(5)} == {"b"}


def test_affinity_follows_the_prefix_until_the_replica_is_too_busy() -> None:
    router = Router()
    prompt = list(range(64))
    assert router.choose([Candidate("a", 0, 0.0), Candidate("b", 1, 0.0)], prompt, BLOCK) == "a"
    busy = AFFINITY_SLACK_REQUESTS  # within the slack over the least loaded: still the prefix's replica
    assert router.choose([Candidate("a", busy, 0.0), Candidate("b", 0, 0.0)], prompt, BLOCK) == "a"
    assert router.choose([Candidate("a", busy + 1, 0.0), Candidate("b", 0, 0.0)], prompt, BLOCK) == "b"
    # Now both have it: the less loaded of the two.
    assert router.choose([Candidate("a", 3, 0.0), Candidate("b", 1, 0.0)], prompt, BLOCK) == "b"
    # A nearly full KV cache would evict the prefix: load decides.
    assert router.choose([Candidate("a", 0, 0.99), Candidate("b", 0, 0.99)], prompt + [1], BLOCK) in ("a", "b")


def test_a_short_shared_beginning_does_not_pull_requests_together() -> None:
    """A shared system prompt that is a small part of each prompt: load decides, not affinity."""
    router = Router()
    header = list(range(8))
    picks = [
        router.choose(
            [Candidate("a", 0, 0.0), Candidate("b", 0, 0.0)], header + list(range(100 + 20 * i, 120 + 20 * i)), BLOCK
        )
        for i in range(8)
    ]
    assert picks.count("a") == picks.count("b") == 4


def test_engines_from_flags_and_file(tmp_path) -> None:
    listed = tmp_path / "engines.txt"
    listed.write_text("# the replicas\nipc:///a.sock\n\n  tcp://10.0.0.2:5555 keys/b.key # second host\n")
    assert engine_entries(["ipc:///x.sock"], str(listed)) == (
        EngineEntry("ipc:///x.sock"),
        EngineEntry("ipc:///a.sock"),
        EngineEntry("tcp://10.0.0.2:5555", "keys/b.key"),
    )
    assert len(engine_entries(None, None)) == 1  # the default address
    with pytest.raises(ValueError, match="ipc:///a.sock"):
        engine_entries(["ipc:///a.sock"], str(listed))
    listed.write_text("tcp://h:1 a.key extra\n")
    with pytest.raises(ValueError, match="engines.txt:1"):
        engine_entries(None, str(listed))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engine", "ipc:///a", "--engine", "ipc:///b", "--served-model-name", "x"], "single engine"),
        (["--engine", "ipc:///a", "--engine", "ipc:///a"], "more than once"),
        (["--engines-file", "/nonexistent/engines.txt"], "engines.txt"),
        (["--engine", "tcp://h:1", "--curve-engine-key", "e.key"], "--curve-secret-key"),
        (["--engine", "nowhere"], "nowhere"),
    ],
)
def test_bad_engine_lists_are_refused_at_start(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert build_parser().parse_args(["--engine", "ipc:///a"]).routing == "prefix-affinity"


def test_affinity_holds_for_prompts_longer_than_the_index_looks_at() -> None:
    from splitinfer.server.router import MAX_CHUNKS

    router = Router()
    shared = list(range(3 * MAX_CHUNKS * BLOCK))  # three times what the index hashes
    first = router.choose([Candidate("a", 0, 0.0), Candidate("b", 0, 0.0)], shared + [1], BLOCK)
    again = [router.choose([Candidate("a", 0, 0.0), Candidate("b", 0, 0.0)], shared + [i], BLOCK) for i in range(4)]
    assert again == [first] * 4
