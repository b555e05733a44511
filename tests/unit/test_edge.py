"""Pure pieces of reputation at the edge (issue 17): DNSBL names and answers, rates and bans,
the iprev method in Authentication-Results, the edge decision table."""

from __future__ import annotations

import os

import pytest

from smtpd_agent.auth import dnsbl
from smtpd_agent.auth.results import header_value
from smtpd_agent.auth.dkim import DkimResult
from smtpd_agent.auth.dmarc import DmarcResult
from smtpd_agent.auth.spf import SpfResult
from smtpd_agent.config import ConfigError, EdgeSettings, Settings
from smtpd_agent.record import Iprev
from smtpd_agent.smtp import replies
from smtpd_agent.smtp.edge import EdgeAction, EdgeDecision, reply_for
from smtpd_agent.smtp.limits import ClientRates, CounterTable, RateKind, RateVerdict


@pytest.mark.parametrize("ip, name", [
    ("192.0.2.99", "99.2.0.192.zen.spamhaus.org"),
    ("::ffff:192.0.2.99", "99.2.0.192.zen.spamhaus.org"),
    ("2001:db8:1:2::ab",
     "b.a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.zen.spamhaus.org"),
])
def test_dnsbl_query_names_follow_rfc_5782(ip, name):
    assert dnsbl.query_name(ip, "zen.spamhaus.org.") == name


@pytest.mark.parametrize("answers, listing", [
    ([], dnsbl.Listing.CLEAR),
    (["127.0.0.2"], dnsbl.Listing.LISTED),
    (["127.0.0.4", "127.0.0.10"], dnsbl.Listing.LISTED),
    (["127.255.255.254"], dnsbl.Listing.ERROR),  # Spamhaus: query via a public resolver
    (["127.0.0.2", "127.255.255.252"], dnsbl.Listing.ERROR),
    (["198.51.100.7"], dnsbl.Listing.ERROR),  # an NXDOMAIN-rewriting resolver
])
def test_only_127_8_answers_are_listings(answers, listing):
    assert dnsbl.classify("bl.example", answers).listing is listing


def test_the_decision_table_maps_each_action_to_its_reply():
    assert reply_for(EdgeDecision(EdgeAction.ACCEPT)) is None
    assert reply_for(EdgeDecision(EdgeAction.BANNED)) is replies.CLIENT_BANNED
    assert reply_for(EdgeDecision(EdgeAction.RATE_EXCEEDED)) is replies.RATE_EXCEEDED
    listed = reply_for(EdgeDecision(EdgeAction.LISTED, "192.0.2.9", ("a.example", "b.example")))
    assert listed is not None
    assert (listed.code, listed.enhanced) == (554, "5.7.1")
    assert "[192.0.2.9]" in listed.text and "a.example, b.example" in listed.text
    for reply in (replies.CLIENT_BANNED, replies.RATE_EXCEEDED):
        assert (reply.code, reply.enhanced) == (421, "4.7.0")


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rates(table: CounterTable | None = None, clock: Clock | None = None, **settings: float
          ) -> ClientRates:
    values = {"rate_window": 60.0, "connection_rate": 3, "message_rate": 2,
              "failed_rcpt_rate": 5, "ban_seconds": 30.0, **settings}
    return ClientRates(table or CounterTable.create(), EdgeSettings(**values),  # type: ignore[arg-type]
                       clock or Clock())


def test_going_over_a_rate_bans_until_the_ban_expires():
    clock = Clock()
    limiter = rates(clock=clock)
    verdicts = [limiter.note("192.0.2.1", RateKind.CONNECTION) for _ in range(5)]
    assert verdicts == [RateVerdict.WITHIN] * 3 + [RateVerdict.EXCEEDED, RateVerdict.BANNED]
    # The ban covers every kind; another client is untouched.
    assert limiter.note("192.0.2.1", RateKind.MESSAGE) is RateVerdict.BANNED
    assert limiter.note("192.0.2.2", RateKind.CONNECTION) is RateVerdict.WITHIN
    assert 29 <= limiter.ban_left("192.0.2.1") <= 31
    clock.now += 31
    assert limiter.ban_left("192.0.2.1") == 0
    # Next window: counts start again.
    clock.now += 60
    assert limiter.note("192.0.2.1", RateKind.CONNECTION) is RateVerdict.WITHIN


def test_kinds_count_apart_and_zero_turns_a_rate_off():
    limiter = rates(failed_rcpt_rate=0)
    assert [limiter.note("192.0.2.1", RateKind.FAILED_RCPT) for _ in range(1000)] == \
        [RateVerdict.WITHIN] * 1000
    assert [limiter.note("192.0.2.1", RateKind.MESSAGE) for _ in range(3)] == \
        [RateVerdict.WITHIN, RateVerdict.WITHIN, RateVerdict.EXCEEDED]


def test_an_ipv6_64_is_one_client():
    limiter = rates()
    for host in range(3):
        assert limiter.note(f"2001:db8:1:2::{host + 1}", RateKind.CONNECTION) is \
            RateVerdict.WITHIN
    assert limiter.note("2001:db8:1:2:ffff::9", RateKind.CONNECTION) is RateVerdict.EXCEEDED
    assert limiter.note("2001:db8:1:3::1", RateKind.CONNECTION) is RateVerdict.WITHIN


def test_rates_and_bans_add_up_across_processes_rows():
    """Two processes' rows of one table (here both in this process): counts add up, and a
    ban written by one is seen by the other."""
    first = CounterTable.create(slots=2)
    second = CounterTable.attach(os.dup(first.fd), 1)
    clock = Clock()
    a, b = rates(first, clock), rates(second, clock)
    assert a.note("192.0.2.1", RateKind.FAILED_RCPT) is RateVerdict.WITHIN
    assert b.note("192.0.2.1", RateKind.FAILED_RCPT) is RateVerdict.WITHIN
    assert a.note("192.0.2.1", RateKind.FAILED_RCPT) is RateVerdict.WITHIN
    assert b.note("192.0.2.1", RateKind.FAILED_RCPT) is RateVerdict.WITHIN
    assert a.note("192.0.2.1", RateKind.FAILED_RCPT) is RateVerdict.WITHIN
    assert b.note("192.0.2.1", RateKind.FAILED_RCPT) is RateVerdict.EXCEEDED  # 6 > 5
    assert a.note("192.0.2.1", RateKind.CONNECTION) is RateVerdict.BANNED
    second.close()
    first.close()


def test_iprev_is_rendered_as_rfc_8601_says():
    spf = SpfResult("pass", "mailfrom", "example.org", "a@example.org", "192.0.2.1")
    value = header_value("mx.test", spf, DkimResult(()), DmarcResult("none"),
                         iprev=Iprev("pass", "192.0.2.1", "mail.example.org"))
    assert value.endswith(";\r\n\tiprev=pass (mail.example.org) policy.iprev=192.0.2.1")
    hostile = header_value("mx.test", spf, DkimResult(()), DmarcResult("none"),
                           iprev=Iprev("fail", "192.0.2.1", "x) dkim=pass (y"))
    assert "iprev=fail (x\\) dkim=pass \\(y) policy.iprev=192.0.2.1" in hostile
    assert "iprev" not in header_value("mx.test", spf, DkimResult(()), DmarcResult("none"))


@pytest.mark.parametrize("key, value", [
    ("edge.failed_rcpt_rate", 70_000), ("edge.connection_rate", -1), ("edge.ban_seconds", 0),
    ("edge.dnsbl", ["not a zone"]), ("edge.dnsbl_action", "drop"),
])
def test_bad_edge_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        Settings().replace({key: value})


def test_exempt_networks_are_never_counted_or_banned():
    limiter = rates()  # default edge.rate_exempt: this host's loopback addresses
    assert {limiter.note("127.0.0.1", RateKind.CONNECTION) for _ in range(100)} == \
        {RateVerdict.WITHIN}
    assert {limiter.note("::1", RateKind.CONNECTION) for _ in range(100)} == {RateVerdict.WITHIN}
    assert limiter.note("::ffff:127.0.0.1", RateKind.CONNECTION) is RateVerdict.WITHIN
    counted = rates(rate_exempt=[])  # type: ignore[arg-type]
    assert [counted.note("127.0.0.1", RateKind.CONNECTION) for _ in range(4)][-1] is \
        RateVerdict.EXCEEDED


def test_only_a_confirmed_name_is_offered_as_the_clients_hostname():
    assert Iprev("pass", "192.0.2.1", "mail.example.org").confirmed_name == "mail.example.org"
    assert Iprev("fail", "192.0.2.1", "forged.example").confirmed_name == ""
