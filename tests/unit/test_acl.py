"""The allow/block list rules (smtpd_agent.acl), table by table: patterns, matching, precedence."""

from __future__ import annotations

import pytest

from smtpd_agent.acl import (
    AclAction,
    AclEntry,
    AclPatternError,
    AclVerdict,
    candidates,
    decide,
    normalize_pattern,
)

ALLOW, BLOCK = AclAction.ALLOW, AclAction.BLOCK
AGENT = 7


@pytest.mark.parametrize("text, pattern", [
    ("Bob@Example.COM", "bob@example.com"),
    ("<bob@example.com>", "bob@example.com"),
    ("@Example.com.", "@example.com"),
    ("example.com", "@example.com"),
    ("first.last+tag@mail.example.co.uk", "first.last+tag@mail.example.co.uk"),
])
def test_normalize_pattern(text, pattern):
    assert normalize_pattern(text) == pattern


@pytest.mark.parametrize("text", ["", "@", "bob@", "com", "@com", "bob@exa mple.com",
                                  "a,b@example.com", "bob@@example.com", "bob@example..com",
                                  "<>", "x" * 64 + ".com"])
def test_normalize_pattern_refuses(text):
    with pytest.raises(AclPatternError):
        normalize_pattern(text)


def test_candidates_cover_the_address_its_domain_and_each_parent():
    assert candidates("Bob@Mail.Example.com") == ["bob@mail.example.com", "@mail.example.com",
                                                  "@example.com", "@com"]
    assert candidates("") == [] and candidates("<>") == [] and candidates("bob") == []


def entry(action: AclAction, pattern: str, agent: int | None = None) -> AclEntry:
    return AclEntry(action, pattern, agent)


@pytest.mark.parametrize("address, entries, allow_list, verdict, pattern", [
    ("bob@example.com", [], False, AclVerdict.UNLISTED, None),
    ("bob@example.com", [], True, AclVerdict.NOT_ALLOWED, None),
    ("bob@example.com", [entry(BLOCK, "@example.com")], False, AclVerdict.BLOCKED, "@example.com"),
    # a domain covers its subdomains, not names that merely end the same way
    ("bob@eu.mx.example.com", [entry(BLOCK, "@example.com")], False, AclVerdict.BLOCKED,
     "@example.com"),
    ("bob@notexample.com", [entry(BLOCK, "@example.com")], False, AclVerdict.UNLISTED, None),
    # exact address before domain, longer domain before shorter
    ("bob@example.com", [entry(BLOCK, "@example.com"), entry(ALLOW, "bob@example.com")], True,
     AclVerdict.ALLOWED, "bob@example.com"),
    ("bob@eu.example.com", [entry(ALLOW, "@example.com"), entry(BLOCK, "@eu.example.com")],
     True, AclVerdict.BLOCKED, "@eu.example.com"),
    # the agent's own entry before the workspace's
    ("bob@example.com", [entry(BLOCK, "bob@example.com"),
                         entry(ALLOW, "@example.com", AGENT)], True, AclVerdict.ALLOWED,
     "@example.com"),
    ("bob@example.com", [entry(ALLOW, "bob@example.com"),
                         entry(BLOCK, "@example.com", AGENT)], True, AclVerdict.BLOCKED,
     "@example.com"),
    # a tie: block wins
    ("bob@example.com", [entry(ALLOW, "@example.com"), entry(BLOCK, "@example.com")], True,
     AclVerdict.BLOCKED, "@example.com"),
    # entries for other addresses are ignored even if handed in
    ("bob@example.com", [entry(BLOCK, "eve@example.com")], False, AclVerdict.UNLISTED, None),
    # the null sender matches nothing: refused only where allow lists are in force
    ("", [entry(BLOCK, "@example.com")], False, AclVerdict.UNLISTED, None),
    ("<>", [], True, AclVerdict.NOT_ALLOWED, None),
])
def test_decide(address, entries, allow_list, verdict, pattern):
    decision = decide(address, entries, allow_list)
    assert decision.verdict is verdict
    assert (decision.entry.pattern if decision.entry else None) == pattern
    assert decision.refused is (verdict in (AclVerdict.BLOCKED, AclVerdict.NOT_ALLOWED))


def test_reason_names_the_rule():
    assert decide("bob@x.test", [entry(BLOCK, "@x.test", AGENT)], False).reason == \
        "blocked by agent entry @x.test"
    assert decide("bob@x.test", [], True).reason == "not allowed"
