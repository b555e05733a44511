"""Address parsing and domain ownership (the database half is in the integration tests)."""

from __future__ import annotations

from smtpd_agent.addresses import parse_address, workspace_of


def test_parse_address_lowercases_and_splits_the_tag():
    parsed = parse_address("<Support+Orders@ACME.Agents.Test.>")
    assert (parsed.local, parsed.tag, parsed.domain) == ("support", "orders", "acme.agents.test")
    assert parse_address("no-at-sign") is None
    assert parse_address("@domain.only") is None


def test_workspace_of():
    assert workspace_of("acme.agents.test", "agents.test") == "acme"
    assert workspace_of("agents.test", "agents.test") is True
    assert workspace_of("deep.acme.agents.test", "agents.test") is True
    assert workspace_of("acmeagents.test", "agents.test") is None
    assert workspace_of("agents.test.evil.com", "agents.test") is None
