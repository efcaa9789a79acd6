"""The routing policy on hand-made candidates (no processes)."""
from __future__ import annotations

from reprise.router.policy import LOAD_TOKENS, Candidate, Reason, choose, rendezvous


def test_longest_prefix_wins_when_idle():
    decision = choose([Candidate("a", 0, 0), Candidate("b", 480, 0), Candidate("c", 160, 0)], b"k")
    assert (decision.url, decision.reason, decision.cached_tokens) == ("b", Reason.PREFIX, 480)


def test_load_outweighs_a_short_prefix():
    # b holds 256 tokens more but has 2 requests ahead: 256 - 2*256 < 0 - 0
    decision = choose([Candidate("a", 0, 0), Candidate("b", LOAD_TOKENS, 2)], b"k")
    assert (decision.url, decision.reason) == ("a", Reason.LOAD)


def test_a_long_prefix_outweighs_some_load():
    decision = choose([Candidate("a", 0, 0), Candidate("b", 2000, 3)], b"k")
    assert (decision.url, decision.reason) == ("b", Reason.PREFIX)


def test_no_prefix_anywhere_goes_by_rendezvous_hash():
    candidates = [Candidate(url, 0, 0) for url in ("a", "b", "c")]
    expected = max("abc", key=lambda url: rendezvous(b"conversation-1", url))
    decision = choose(candidates, b"conversation-1")
    assert (decision.url, decision.reason) == (expected, Reason.AFFINITY)
    # the same key keeps its replica when another replica goes away
    remaining = [c for c in candidates if c.url == expected or c.url != min(set("abc") - {expected})]
    assert choose(remaining, b"conversation-1").url == expected


def test_no_prefix_and_uneven_load_goes_to_the_idle_replica():
    key = b"x"
    favourite = max("ab", key=lambda url: rendezvous(key, url))
    other = "b" if favourite == "a" else "a"
    decision = choose([Candidate(favourite, 0, 1), Candidate(other, 0, 0)], key)
    assert (decision.url, decision.reason) == (other, Reason.LOAD)
