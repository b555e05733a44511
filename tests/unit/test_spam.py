"""spam.py's pure parts, table by table: rspamd's reply, the request headers, the decision."""

from __future__ import annotations

import json

import pytest

from smtpd_agent.config import SpamSettings
from smtpd_agent.message import parse_message
from smtpd_agent.record import Envelope, InboundMessage, Iprev, Mailbox, Recipient
from smtpd_agent.spam import (Disposition, SpamReason, RspamdAction, RspamdOutcome, SpamResult,
                              classify, decide, parse_reply, request_headers)

MAILBOX = Mailbox(workspace_id=1, workspace_slug="acme", agent_id=1, handle="support",
                  domain="acme.example")


def reply(action: str = "no action", score: object = 1.5, **extra: object) -> bytes:
    return json.dumps({"action": action, "score": score, "required_score": 15.0,
                       "symbols": {"A": {"name": "A", "score": 0.5},
                                   "BIG": {"name": "BIG", "score": 8.0},
                                   "bad name\r\nX-Injected: 1": {"score": 1.0}},
                       **extra}).encode()


def test_parse_reply_keeps_action_score_and_clean_symbols_highest_first() -> None:
    parsed = parse_reply(reply("add header", 9.4))
    assert parsed is not None
    assert (parsed.action, parsed.score, parsed.required_score) == (
        RspamdAction.ADD_HEADER, 9.4, 15.0)
    assert parsed.symbols == (("BIG", 8.0), ("A", 0.5))


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[]", b'{"score": 1}', b'{"action": "no action"}',
    b'{"action": "explode", "score": 1}', b'{"action": "reject", "score": "high"}',
    b'{"action": "reject", "score": true}', b'{"action": "reject", "score": NaN}',
    b"[" * 100_000,
])
def test_unreadable_replies_are_none(body: bytes) -> None:
    assert parse_reply(body) is None


@pytest.mark.parametrize(("outcome", "status", "problem"), [
    (RspamdOutcome("done", body=reply()), "scored", None),
    (RspamdOutcome("done", body=b"{}"), "unscored", "bad_reply"),
    (RspamdOutcome("connect_failed", detail="refused"), "unscored", "connect_failed"),
    (RspamdOutcome("timeout"), "unscored", "timeout"),
    (RspamdOutcome("http_error", detail="HTTP 500"), "unscored", "http_error"),
])
def test_classify(outcome: RspamdOutcome, status: str, problem: str | None) -> None:
    result = classify(outcome)
    assert (result.status, result.problem) == (status, problem)


def scored(action: RspamdAction) -> SpamResult:
    return SpamResult("scored", action=action, score=1.0)


@pytest.mark.parametrize(("result", "settings", "action", "reason"), [
    (None, SpamSettings(), Disposition.ACCEPT_UNSCORED, SpamReason.NOT_SPAM),
    (scored(RspamdAction.NO_ACTION), SpamSettings(), Disposition.ACCEPT, SpamReason.NOT_SPAM),
    (scored(RspamdAction.ADD_HEADER), SpamSettings(), Disposition.LABEL, SpamReason.SPAM),
    (scored(RspamdAction.REWRITE_SUBJECT), SpamSettings(), Disposition.LABEL, SpamReason.SPAM),
    (scored(RspamdAction.REJECT), SpamSettings(), Disposition.REJECT, SpamReason.SPAM),
    (scored(RspamdAction.SOFT_REJECT), SpamSettings(), Disposition.TEMPFAIL,
     SpamReason.SOFT_REJECT),
    (scored(RspamdAction.GREYLIST), SpamSettings(), Disposition.ACCEPT, SpamReason.GREYLIST),
    (scored(RspamdAction.GREYLIST), SpamSettings(greylist="label"), Disposition.LABEL,
     SpamReason.GREYLIST),
    (scored(RspamdAction.GREYLIST), SpamSettings(greylist="tempfail"), Disposition.TEMPFAIL,
     SpamReason.GREYLIST),
    (SpamResult("unscored", problem="timeout"), SpamSettings(), Disposition.ACCEPT_UNSCORED,
     SpamReason.FILTER_UNAVAILABLE),
    (SpamResult("unscored", problem="timeout"), SpamSettings(required=True),
     Disposition.TEMPFAIL, SpamReason.FILTER_UNAVAILABLE),
    # required changes nothing once rspamd has answered
    (scored(RspamdAction.NO_ACTION), SpamSettings(required=True), Disposition.ACCEPT,
     SpamReason.NOT_SPAM),
])
def test_decide(result: SpamResult | None, settings: SpamSettings, action: Disposition,
                reason: SpamReason) -> None:
    decision = decide(result, settings)
    assert (decision.action, decision.reason) == (action, reason)


def test_request_headers_one_rcpt_per_recipient_and_nothing_unsafe() -> None:
    envelope = Envelope(
        session_id="s", client_ip="192.0.2.7", helo="mail.example\r\nX-Evil: 1",
        mail_from="alice@example.org",
        recipients=(Recipient("a@acme.example", MAILBOX), Recipient("b@acme.example", MAILBOX)))
    message = InboundMessage(envelope=envelope, raw=b"", parsed=parse_message(b"\r\n"))
    headers = request_headers(message, "mx.example", "Q1")
    assert headers.getall("Rcpt") == ["a@acme.example", "b@acme.example"]
    assert (headers["IP"], headers["From"], headers["Queue-Id"], headers["MTA-Name"]) == (
        "192.0.2.7", "alice@example.org", "Q1", "mx.example")
    assert headers["Helo"] == "mail.exampleX-Evil: 1"
    assert "Hostname" not in headers  # no iprev: rspamd must not be told a name we never checked


@pytest.mark.parametrize("iprev,hostname", [
    (Iprev("pass", "192.0.2.7", "mail.example.org"), "mail.example.org"),
    (Iprev("fail", "192.0.2.7", "forged.example.org"), None),
    (Iprev("permerror", "192.0.2.7"), None),
])
def test_hostname_is_sent_only_when_iprev_confirmed_it(iprev, hostname) -> None:
    envelope = Envelope(session_id="s", client_ip="192.0.2.7", helo="client.example",
                        mail_from="a@example.org", recipients=(Recipient("a@acme.example", MAILBOX),), iprev=iprev)
    message = InboundMessage(envelope=envelope, raw=b"", parsed=parse_message(b"\r\n"))
    assert request_headers(message, "mx.example", "Q1").get("Hostname") == hostname
