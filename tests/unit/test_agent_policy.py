"""Pure pieces of the agent stage, table by table: loop rules, limits, backoff, addresses."""

from __future__ import annotations

import subprocess
import sys
import typing
import warnings

import pytest
from anthropic.resources.messages import messages as sdk_messages
from anthropic.types.model_param import ModelParam
from structlog.testing import capture_logs

from smtpd_agent.agent.caps import Caps, CapRule, Counts, describe, exceeded
from smtpd_agent.agent.llm import LLM, classify_error, deprecation_of
from smtpd_agent.agent.prompt import Prompt
from smtpd_agent.logs import route_warnings_to_log
from smtpd_agent.agent.policy import (
    MessageFacts,
    loop_skip_reason,
    parent_domains,
    reply_address,
    retry_delay,
    unauthenticated_reason,
)
from smtpd_agent.config import AgentSettings, ConfigError, load_settings
from tests.messages_api import API_KEY, MessagesAPI

OWN = "agents.test"


def facts(*headers: tuple[str, str], mail_from: str = "alice@example.org",
          from_address: str | None = "alice@example.org", dmarc: str | None = "pass",
          quarantined: bool = False, scan_status: str | None = "skipped",
          spf: str | None = None, spf_domain: str = "",
          dkim_pass_domains: tuple[str, ...] = ()) -> MessageFacts:
    return MessageFacts(headers=headers, mail_from=mail_from, from_address=from_address,
                        dmarc=dmarc, quarantined=quarantined, scan_status=scan_status,
                        spf=spf, spf_domain=spf_domain, dkim_pass_domains=dkim_pass_domains)


@pytest.mark.parametrize("message, reason", [
    (facts(), None),
    (facts(("Auto-Submitted", "no")), None),
    (facts(("Auto-Submitted", "No ; comment")), None),
    (facts(("Auto-Submitted", "auto-replied")), "Auto-Submitted: auto-replied"),
    (facts(("auto-submitted", "auto-generated; x")), "Auto-Submitted: auto-generated"),
    (facts(("Auto-Submitted", "auto-notified")), "Auto-Submitted: auto-notified"),
    (facts(("Precedence", "bulk")), "Precedence: bulk"),
    (facts(("Precedence", "LIST")), "Precedence: list"),
    (facts(("Precedence", "junk")), "Precedence: junk"),
    (facts(("Precedence", "first-class")), None),
    (facts(("List-Id", "<x.example.org>")), "mailing list (List-Id)"),
    (facts(("List-Unsubscribe", "<mailto:u@x>")), "mailing list (List-Unsubscribe)"),
    (facts(("X-Auto-Response-Suppress", "OOF, AutoReply")),
     "X-Auto-Response-Suppress: oof, autoreply"),
    (facts(mail_from=""), "null sender (bounce or DSN)"),
    (facts(mail_from="<>"), "null sender (bounce or DSN)"),
    (facts(mail_from="MAILER-DAEMON@mx.example.org"),
     "automated sender (MAILER-DAEMON@mx.example.org)"),
    (facts(from_address="postmaster@example.org"), "automated sender (postmaster@example.org)"),
    (facts(from_address="noreply@shop.example"), "automated sender (noreply@shop.example)"),
    (facts(from_address="no-reply@shop.example"), "automated sender (no-reply@shop.example)"),
    (facts(from_address="do-not-reply@shop.example"),
     "automated sender (do-not-reply@shop.example)"),
    (facts(mail_from="news-bounces@list.example"), "automated sender (news-bounces@list.example)"),
    (facts(mail_from="owner-users@list.example"), "automated sender (owner-users@list.example)"),
    (facts(from_address="noreen@example.org"), None),
    (facts(mail_from="sales@acme.agents.test"), "from our own agents (sales@acme.agents.test)"),
    (facts(from_address="support@ACME.agents.test"),
     "from our own agents (support@ACME.agents.test)"),
    (facts(from_address="x@agents.test.evil.example"), None),
    (facts(dmarc="fail"), "sender not authenticated: DMARC fail"),
    (facts(dmarc="fail", quarantined=True), "quarantined"),
    (facts(dmarc="temperror"), "sender not authenticated: DMARC temperror"),
    (facts(scan_status="infected"), "scan status infected"),
    (facts(scan_status="unscanned"), "scan status unscanned"),
    (facts(scan_status="error"), "scan status error"),
    (facts(scan_status="clean"), None),
    (facts(scan_status=None), None),
    (facts(dmarc="none"), ("sender not authenticated: example.org has no DMARC record and "
                           "neither SPF nor DKIM passed for it")),
    (facts(dmarc="none", spf="pass", spf_domain="example.org"), None),
])
def test_loop_skip_reason(message, reason):
    assert loop_skip_reason(message, OWN) == reason


@pytest.mark.parametrize("address, reason", [
    ("sales@mail.acme.test", "from our own agents (sales@mail.acme.test)"),
    ("bounce@x.mail.acme.test", "from our own agents (bounce@x.mail.acme.test)"),
    ("alice@acme.test", None),
    ("alice@notmail.acme.test", None),
])
def test_custom_domains_are_ours_too(address, reason):
    custom = frozenset({"mail.acme.test"})
    assert loop_skip_reason(facts(from_address=address), OWN, custom) == reason


@pytest.mark.parametrize("domain, parents", [
    ("a.b.mail.acme.test", ["a.b.mail.acme.test", "b.mail.acme.test", "mail.acme.test",
                            "acme.test"]),
    ("Example.ORG.", ["example.org"]),
    ("localhost", ["localhost"]),
])
def test_parent_domains(domain, parents):
    assert parent_domains(domain) == parents


@pytest.mark.parametrize("attempt, retry_after, delay", [
    (1, None, 10.0), (2, None, 20.0), (3, None, 40.0), (7, None, 640.0), (8, None, 900.0),
    (20, None, 900.0), (1, 30.0, 30.0), (1, 5.0, 10.0), (1, 5000.0, 900.0),
])
def test_retry_delay_doubles_up_to_the_cap(attempt, retry_after, delay):
    assert retry_delay(attempt, 10.0, 900.0, retry_after) == delay


NO_RECORD = ("sender not authenticated: example.org has no DMARC record and neither SPF nor "
             "DKIM passed for it")


@pytest.mark.parametrize("message, reason", [
    (facts(dmarc="pass"), None),
    (facts(dmarc="fail", spf="pass", spf_domain="example.org"),
     "sender not authenticated: DMARC fail"),
    (facts(dmarc="temperror"), "sender not authenticated: DMARC temperror"),
    (facts(dmarc="permerror", spf="pass", spf_domain="example.org"),
     "sender not authenticated: DMARC permerror"),
    (facts(dmarc=None), "sender not authenticated: DMARC not evaluated"),
    (facts(dmarc="none"), NO_RECORD),
    # no DMARC record: an aligned (relaxed) SPF or DKIM pass stands in
    (facts(dmarc="none", spf="pass", spf_domain="example.org"), None),
    (facts(dmarc="none", spf="pass", spf_domain="bounces.example.org"), None),
    (facts(dmarc="none", spf="pass", spf_domain="mailer.test"), NO_RECORD),
    (facts(dmarc="none", spf="softfail", spf_domain="example.org"), NO_RECORD),
    (facts(dmarc="none", dkim_pass_domains=("example.org",)), None),
    (facts(dmarc="none", dkim_pass_domains=("esp.test", "mail.example.org")), None),
    (facts(dmarc="none", dkim_pass_domains=("esp.test",)), NO_RECORD),
    # the Public Suffix List: two customers of one public suffix are not one organization
    (facts(dmarc="none", from_address="alice@a.co.uk", spf="pass", spf_domain="b.co.uk"),
     ("sender not authenticated: a.co.uk has no DMARC record and neither SPF nor DKIM passed "
      "for it")),
    (facts(dmarc="none", from_address=None, spf="pass", spf_domain="example.org"),
     "sender not authenticated: no From address"),
])
def test_unauthenticated_reason(message, reason):
    assert unauthenticated_reason(message) == reason


def test_facts_read_the_stored_auth_detail():
    detail = {"spf_detail": {"result": "pass", "domain": "example.org"},
              "dkim_signatures": [{"result": "fail", "domain": "example.org"},
                                  {"result": "pass", "domain": "esp.test"}, "junk"]}
    built = MessageFacts.with_auth_detail(detail, headers=(), mail_from="a@example.org",
                                          from_address="a@example.org", dmarc="none",
                                          quarantined=False, scan_status="clean")
    assert (built.spf, built.spf_domain, built.dkim_pass_domains) == ("pass", "example.org",
                                                                      ("esp.test",))
    empty = MessageFacts.with_auth_detail(None, headers=(), mail_from="", from_address=None,
                                          dmarc=None, quarantined=False, scan_status=None)
    assert (empty.spf, empty.spf_domain, empty.dkim_pass_domains) == (None, "", ())


@pytest.mark.parametrize("from_address, reply_to, expected", [
    ("alice@example.org", None, "alice@example.org"),
    ("alice@example.org", "desk@example.org", "desk@example.org"),
    ("alice@example.org", "Desk <desk@example.org>", "desk@example.org"),
    ("alice@example.org", "desk@support.example.org", "desk@support.example.org"),
    ("alice@mail.example.org", "desk@example.org", "desk@example.org"),
    # another organization: ignored, whatever authenticated the From
    ("alice@example.org", "victim@elsewhere.test", "alice@example.org"),
    ("alice@example.org", "victim@example.org.evil.test", "alice@example.org"),
    ("alice@a.co.uk", "victim@b.co.uk", "alice@a.co.uk"),
    ("alice@example.org", "attacker@evil.test, x@y.z", "alice@example.org"),
    ("alice@example.org", "desk@example.org, x@example.org", "alice@example.org"),
    (None, "desk@example.org", None),
    ("not an address", None, None),
    ("alice@example.org\r\nBcc: attacker@evil.test", None, None),
])
def test_reply_address(from_address, reply_to, expected):
    assert reply_address(from_address, reply_to) == expected


CAPS = Caps(per_correspondent=5, per_agent=200, workspace_per_hour=100,
            workspace_per_day=1000, new_recipients_per_day=10)


def counts(to=0, agent=0, hour=0, day=0, new=0, new_today=0) -> Counts:
    return Counts(to, agent, hour, day, new, new_today)


@pytest.mark.parametrize("found, rule", [
    (counts(), None),
    (counts(to=4, agent=199, hour=99, day=999, new=1, new_today=9), None),
    (counts(to=5), CapRule.CORRESPONDENT_PER_HOUR),
    (counts(agent=200), CapRule.AGENT_PER_HOUR),
    (counts(hour=100), CapRule.WORKSPACE_PER_HOUR),
    (counts(day=1000), CapRule.WORKSPACE_PER_DAY),
    (counts(new=1, new_today=10), CapRule.NEW_RECIPIENTS_PER_DAY),
    (counts(new=0, new_today=10), None),  # someone it wrote to before does not count
    # an API send to several first-time recipients needs room for all of them
    (counts(new=3, new_today=7), None),
    (counts(new=4, new_today=7), CapRule.NEW_RECIPIENTS_PER_DAY),
    (counts(new=11), CapRule.NEW_RECIPIENTS_PER_DAY),
    # the first rule that applies wins
    (counts(to=5, day=1000), CapRule.CORRESPONDENT_PER_HOUR),
])
def test_caps_exceeded(found, rule):
    assert exceeded(found, CAPS) == rule


def test_a_cap_of_zero_allows_none():
    assert exceeded(counts(), Caps(0, 200, 100, 1000, 10)) == CapRule.CORRESPONDENT_PER_HOUR
    assert exceeded(counts(), Caps(5, 200, 100, 1000, 0)) is None  # nobody new
    assert exceeded(counts(new=1), Caps(5, 200, 100, 1000, 0)) == \
        CapRule.NEW_RECIPIENTS_PER_DAY


@pytest.mark.parametrize("rule, text", [
    (CapRule.CORRESPONDENT_PER_HOUR, "rate limit: 5 replies per hour to this correspondent"),
    (CapRule.AGENT_PER_HOUR, "rate limit: 200 replies per hour from this agent"),
    (CapRule.WORKSPACE_PER_HOUR, "cap: 100 replies per hour from this workspace"),
    (CapRule.WORKSPACE_PER_DAY, "cap: 1000 replies per day from this workspace"),
    (CapRule.NEW_RECIPIENTS_PER_DAY, "cap: 10 first-time recipients per day for this agent"),
])
def test_cap_reasons_name_the_limit(rule, text):
    assert describe(rule, CAPS.limit(rule)) == text
    # the rule is the config key that sets it
    section, _, key = rule.value.partition(".")
    assert section == "agent" and getattr(AgentSettings(), key) >= 0


def test_default_model_is_one_the_sdk_accepts_and_we_do_not_ship_it_deprecated():
    model = AgentSettings().model
    listed = typing.get_args(typing.get_args(ModelParam)[0])
    assert model in listed and "sonnet" in model
    assert deprecation_of(model) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_settings(path="config/smtpd-agent.toml", env={}).agent.model == model


async def test_a_deprecation_warning_from_the_sdk_reaches_our_log():
    """Whichever model the pinned SDK deprecates: its own warning, at request time, is logged."""
    deprecated = next(iter(sdk_messages.DEPRECATED_MODELS), None)
    assert deprecated, "the pinned SDK deprecates no model: pick another way to make it warn"
    with warnings.catch_warnings(), MessagesAPI() as api, capture_logs() as events:
        route_warnings_to_log()
        llm = LLM(AgentSettings(api_key=API_KEY, base_url=api.base_url, model=deprecated))
        try:
            await llm.complete(Prompt(system="s", messages=[{"role": "user", "content": "hi"}]))
        finally:
            await llm.close()
    logged = [e for e in events if e["event"] == "python.warning"]
    assert logged and logged[0]["category"] == "DeprecationWarning"
    assert deprecated in logged[0]["message"]


def test_lease_must_outlast_the_api_timeout():
    with pytest.raises(ConfigError, match=r"^agent\.lease"):
        load_settings(env={}, overrides={"agent.lease": 30.0, "agent.timeout": 60.0})


def test_unexpected_errors_are_not_retried():
    assert classify_error(ValueError("boom")).outcome == "fail"


def test_the_sdk_is_not_imported_until_a_client_is_made():
    """Accepting processes (smtp.processes) never call the API: ~50 MB each saved."""
    probe = ("import sys, smtpd_agent.cli, smtpd_agent.app; "
             "assert 'anthropic' not in sys.modules, 'imported at start-up'")
    subprocess.run([sys.executable, "-c", probe], check=True)
