"""The one table: every decision has its reply, every aiosmtpd text its enhanced code, and
answer() counts each refusal once."""

from __future__ import annotations

import typing

import pytest
from aiosmtpd.testing.statuscodes import SMTP_STATUS_CODES, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from smtpd_agent.auth import AuthReason
from smtpd_agent.ingress import ContentVerdict, RcptVerdict
from smtpd_agent.metrics import Metrics
from smtpd_agent.pipeline import MessageVerdict
from smtpd_agent.scan import ScanReason
from smtpd_agent.spam import SpamReason
from smtpd_agent.smtp import replies
from smtpd_agent.smtp.replies import (
    BUILTIN_DETAILS,
    NO_REPLY,
    REPLIES,
    SessionVerdict,
    answer,
    builtin_detail,
    enhance,
    http_answer,
    reply_for,
)

DECISIONS = [member for enum in typing.get_args(replies.Verdict) for member in enum]
# What aiosmtpd lists but never reaches a client of ours: its HELO reply (ours is
# replies.helo), and the codes of its AUTH, which we do not offer.
NOT_SENT = {"S250_FQDN"}


def aiosmtpd_statuses() -> list[tuple[str, StatusCode]]:
    statuses = [(name, value) for name, value in vars(SMTP_STATUS_CODES).items()
                if isinstance(value, StatusCode) and name not in NOT_SENT]
    assert len(statuses) > 60  # the list was found
    return statuses


@pytest.mark.parametrize("name, status", aiosmtpd_statuses(),
                         ids=[name for name, _ in aiosmtpd_statuses()])
def test_every_aiosmtpd_status_has_an_enhanced_code(name, status):
    if b"%b" in status.mesg:
        status = status(b"XYZZY")
    line = status.to_bytes()
    if 300 <= status.code < 400:
        assert enhance(line) == line  # RFC 2034: intermediate replies carry none
        return
    enhanced = enhance(line)
    assert enhanced[:6] == b"%d %d." % (status.code, status.code // 100), enhanced
    if not replies.ENHANCED.match(line):
        assert builtin_detail(status.code, status.mesg.decode()) is not None, name


def test_the_builtin_table_names_only_texts_aiosmtpd_has():
    texts = {(s.code, s.mesg.decode()) for _, s in aiosmtpd_statuses()}
    for code, text in BUILTIN_DETAILS:
        if "{}" in text:
            head = text.split("{}")[0]
            assert any(c == code and t.startswith(head) for c, t in texts), (code, text)
        else:
            assert (code, text) in texts, (code, text)


def test_an_unknown_text_gets_the_class_code_and_is_logged():
    from structlog.testing import capture_logs
    with capture_logs() as logs:
        assert enhance(b"554 something new") == b"554 5.0.0 something new"
    assert [e["event"] for e in logs] == ["smtp.reply_unmapped"]


@pytest.mark.parametrize("decision", DECISIONS, ids=[f"{type(d).__name__}.{d.name}"
                                                     for d in DECISIONS])
def test_every_decision_has_one_reply_or_is_no_reply(decision):
    assert (decision in REPLIES) != (decision in NO_REPLY)


def test_no_two_decisions_share_a_key():
    """StrEnum members of two enums with one value would be one key of the table."""
    assert len(REPLIES) + len(NO_REPLY) == len(DECISIONS)


def test_temporary_decisions_are_4xx_and_tell_providers_to_retry():
    temporary = {RcptVerdict.TEMPFAIL, RcptVerdict.TOO_MANY_RECIPIENTS, AuthReason.DNS_TEMPERROR,
                 ScanReason.SCANNER_ERROR, ScanReason.SCANNER_UNAVAILABLE,
                 SpamReason.SOFT_REJECT, SpamReason.GREYLIST, SpamReason.FILTER_UNAVAILABLE,
                 MessageVerdict.STORE_TEMPFAIL, MessageVerdict.BOUNCE_TEMPFAIL, MessageVerdict.ACL_TEMPFAIL,
                 SessionVerdict.DATA_BUDGET_EXHAUSTED, SessionVerdict.DATA_TOO_SLOW}
    for decision, reply in REPLIES.items():
        assert reply.temporary == (decision in temporary), decision
        outcome, status = http_answer(reply, "mailgun")
        expected = (("accepted", 200) if reply.code < 300 else ("tempfail", 503)
                    if reply.temporary else ("rejected", 406))
        assert (outcome, status) == expected, decision


def test_replies_name_what_the_client_needs():
    assert str(reply_for(MessageVerdict.ACCEPTED, queue_id="abc.1")) == "250 2.0.0 abc.1 queued"
    assert reply_for(ScanReason.VIRUS, signature="Eicar-Test-Signature").text.endswith(
        "(Eicar-Test-Signature)")
    assert "(session s1)" in str(reply_for(MessageVerdict.STORE_TEMPFAIL, session_id="s1"))
    assert str(reply_for(AuthReason.DMARC_REJECT)).startswith("550 5.7.1 ")
    assert str(reply_for(AuthReason.SPF_FAIL)).startswith("550 5.7.23 ")
    assert replies.helo("mx.test") == b"250 mx.test\r\n"  # RFC 2034: no enhanced code


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_answer_counts_each_refusal_once_by_stage_and_accepts_by_transport():
    metrics = Metrics()
    answer(RcptVerdict.RELAY_DENIED, "smtp", metrics)
    answer(RcptVerdict.MAILBOX, "smtp", metrics)  # a RCPT accepted is no message yet
    answer(ContentVerdict.BARE_LF, "mailgun", metrics)
    answer(MessageVerdict.ACCEPTED, "ses", metrics, queue_id="q")
    rejected = samples(metrics, "smtpd_agent_messages_rejected_total")
    assert rejected == {
        (("code", "550"), ("reason", "relay denied"), ("stage", "rcpt"), ("transport", "smtp")): 1,
        (("code", "550"), ("reason", "bare LF"), ("stage", "data"), ("transport", "mailgun")): 1,
    }
    assert samples(metrics, "smtpd_agent_messages_accepted_total") == {
        (("transport", "ses"),): 1}
