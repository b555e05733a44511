"""The whole stage over real DNS: SPF + DKIM + ARC concurrently, then DMARC, then decide()."""

from __future__ import annotations

import json

import pytest

from smtpd_agent.auth import AuthResult, authenticate, decide
from smtpd_agent.auth.dkim import DkimResult
from smtpd_agent.auth.dmarc import evaluate_dmarc
from smtpd_agent.auth.spf import SpfResult
from smtpd_agent.config import AuthSettings
from smtpd_agent.message import parse_message
from smtpd_agent.record import Envelope, InboundMessage

from .keys import message, sign

CLIENT = "192.0.2.10"
AUTHSERV = "mx.test.example"


def inbound(raw: bytes, mail_from: str, helo: str = "mail.example.com",
            client_ip: str = CLIENT) -> InboundMessage:
    envelope = Envelope(session_id="s1", client_ip=client_ip, helo=helo, mail_from=mail_from,
                        recipients=())
    return InboundMessage(envelope=envelope, raw=raw, parsed=parse_message(raw))


async def run(resolver, raw, mail_from, settings=None, **kw) -> AuthResult:
    settings = settings or AuthSettings(authserv_id=AUTHSERV, timeout=5)
    return await authenticate(inbound(raw, mail_from, **kw), resolver, settings, AUTHSERV)


async def test_dmarc_pass_via_spf_only(dns_server, resolver):
    dns_server.txt("bounce.example.com", f"v=spf1 ip4:{CLIENT} -all")
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    result = await run(resolver, message(), "b@bounce.example.com")
    assert (result.spf, result.dkim, result.dmarc) == ("pass", "none", "pass")
    assert result.dmarc_detail.aligned == ("spf",)  # relaxed: bounce.example.com ~ example.com
    assert decide(result, AuthSettings()).action == "accept"


async def test_dmarc_pass_via_dkim_only(dns_server, resolver, ed25519):
    dns_server.txt("ed._domainkey.example.com", ed25519.record)
    dns_server.txt("elsewhere.net", "v=spf1 -all")
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    raw = sign(message(), ed25519, "example.com", "ed")
    result = await run(resolver, raw, "list@elsewhere.net")
    assert (result.spf, result.dkim, result.dmarc) == ("fail", "pass", "pass")
    assert result.dmarc_detail.aligned == ("dkim",)
    # SPF failed, but DMARC passed through an aligned signature: even spf_fail=reject accepts.
    assert decide(result, AuthSettings(spf_fail="reject")).action == "accept"


async def test_unaligned_dkim_does_not_count(dns_server, resolver, ed25519):
    dns_server.txt("ed._domainkey.other.org", ed25519.record)
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    raw = sign(message(), ed25519, "other.org", "ed")
    result = await run(resolver, raw, "x@other.org")
    assert (result.dkim, result.dmarc, result.dmarc_policy) == ("pass", "fail", "reject")


async def test_strict_alignment(dns_server, resolver):
    dns_server.txt("bounce.example.com", f"v=spf1 ip4:{CLIENT} -all")
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=quarantine; aspf=s")
    result = await run(resolver, message(), "b@bounce.example.com")
    assert (result.spf, result.dmarc) == ("pass", "fail")


async def test_subdomain_inherits_sp(dns_server, resolver):
    dns_server.txt("_dmarc.example.org", "v=DMARC1; p=none; sp=reject")
    result = await run(resolver, message("ceo@news.example.org"), "x@spoof.test")
    assert result.dmarc == "fail"
    assert result.dmarc_detail.record_domain == "example.org"
    assert (result.dmarc_policy, result.dmarc_disposition) == ("reject", "reject")
    decision = decide(result, AuthSettings())
    assert (decision.action, decision.reason) == ("reject", "dmarc policy reject")
    # The organizational domain itself gets p=none.
    result = await run(resolver, message("ceo@example.org"), "x@spoof.test")
    assert (result.dmarc, result.dmarc_policy) == ("fail", "none")
    assert decide(result, AuthSettings()).action == "accept"


async def test_p_reject_fail_is_rejected(dns_server, resolver):
    dns_server.txt("example.com", "v=spf1 -all")
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=reject; rua=mailto:d@reports.example.net")
    result = await run(resolver, message(), "alice@example.com")
    assert (result.spf, result.dmarc, result.dmarc_policy) == ("fail", "fail", "reject")
    assert decide(result, AuthSettings()).action == "reject"
    # The operator may keep such mail instead (auth.dmarc_reject = false).
    assert decide(result, AuthSettings(dmarc_reject=False)).action == "quarantine"
    # checkdmarc never looked up the rua destination (only our resolver's queries hit DNS).
    assert not [q for q in dns_server.queries if "reports.example.net" in q[1]]


async def test_p_quarantine(dns_server, resolver):
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=quarantine")
    result = await run(resolver, message(), "x@spoof.test")
    decision = decide(result, AuthSettings())
    assert (result.dmarc, decision.action, decision.reason) == \
        ("fail", "quarantine", "dmarc policy quarantine")


async def test_no_record_is_none(dns_server, resolver):
    result = await run(resolver, message("a@norecord.example"), "x@spoof.test")
    assert (result.spf, result.dmarc, result.dmarc_policy) == ("none", "none", "")
    assert decide(result, AuthSettings()).action == "accept"


async def test_pass_keeps_published_policy(dns_server, resolver):
    dns_server.txt("bounce.example.com", f"v=spf1 ip4:{CLIENT} -all")
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    result = await run(resolver, message(), "b@bounce.example.com")
    assert (result.dmarc, result.dmarc_policy, result.dmarc_disposition) == ("pass", "reject", "")


async def test_pct_sampling_weakens_policy(dns_server, resolver):
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=reject; pct=10")
    spf = SpfResult("none", "mailfrom", "spoof.test", "x@spoof.test", CLIENT)
    inside = await evaluate_dmarc(resolver, "a@example.com", spf, DkimResult(), draw=0.05)
    outside = await evaluate_dmarc(resolver, "a@example.com", spf, DkimResult(), draw=0.5)
    assert (inside.disposition, outside.disposition) == ("reject", "quarantine")


async def test_dmarc_dns_timeout_is_temperror(dns_server, resolver):
    dns_server.set_timeout("_dmarc.example.com")
    result = await run(resolver, message(), "x@spoof.test")
    assert result.dmarc == "temperror"
    assert decide(result, AuthSettings()) .action == "accept"
    decision = decide(result, AuthSettings(temperror="tempfail"))
    assert (decision.action, decision.reason) == ("tempfail", "dns temperror")


async def test_spf_timeout_is_temperror(dns_server, resolver):
    dns_server.set_timeout("slow.example.net")
    result = await run(resolver, message("a@slow.example.net"), "x@slow.example.net")
    assert result.spf == "temperror"


async def test_null_sender_checks_helo(dns_server, resolver):
    dns_server.txt("mail.example.com", f"v=spf1 ip4:{CLIENT} -all")
    result = await run(resolver, message(), "")
    assert result.spf == "pass"
    assert result.spf_detail.identity == "helo"
    assert "smtp.helo=mail.example.com" in result.header_value


async def test_spf_fail_policy(dns_server, resolver):
    dns_server.txt("example.com", "v=spf1 -all")
    result = await run(resolver, message("a@unrelated.example"), "a@example.com")
    assert result.spf == "fail"
    assert decide(result, AuthSettings()).action == "accept"
    decision = decide(result, AuthSettings(spf_fail="reject"))
    assert (decision.action, decision.reason) == ("reject", "spf fail")


async def test_treewalk_discovery(dns_server, resolver):
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=reject; sp=quarantine")
    settings = AuthSettings(authserv_id=AUTHSERV, dmarc_discovery="treewalk", timeout=5)
    result = await run(resolver, message("a@x.y.example.com"), "x@spoof.test", settings)
    assert (result.dmarc, result.dmarc_policy) == ("fail", "quarantine")
    assert result.dmarc_detail.record_domain == "example.com"


async def test_result_is_json_and_header(dns_server, resolver, rsa2048):
    dns_server.txt("sel._domainkey.example.com", rsa2048.record)
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=none")
    result = await run(resolver, sign(message(), rsa2048, "example.com"), "a@example.com")
    data = json.loads(json.dumps(result.to_dict()))
    assert data["dkim_signatures"][0]["domain"] == "example.com"
    assert result.header_value.startswith(AUTHSERV + ";")
    for piece in ("spf=none smtp.mailfrom=a@example.com", "dkim=pass header.d=example.com",
                  "header.s=sel header.a=rsa-sha256", "dmarc=pass", "header.from=example.com",
                  "arc=none"):
        assert piece in result.header_value


@pytest.mark.parametrize(("spf", "dkim", "dmarc", "policy", "settings", "action", "reason"), [
    ("pass", "pass", "pass", "none", {}, "accept", ""),
    ("fail", "none", "fail", "reject", {}, "reject", "dmarc policy reject"),
    ("fail", "none", "fail", "reject", {"dmarc_reject": False}, "quarantine",
     "dmarc policy reject"),
    ("none", "none", "fail", "quarantine", {}, "quarantine", "dmarc policy quarantine"),
    ("none", "none", "fail", "none", {}, "accept", ""),
    ("fail", "none", "none", "", {}, "accept", "spf fail"),
    ("fail", "none", "none", "", {"spf_fail": "reject"}, "reject", "spf fail"),
    ("softfail", "none", "none", "", {"spf_fail": "reject"}, "accept", ""),
    ("temperror", "none", "none", "", {}, "accept", "dns temperror"),
    ("temperror", "none", "none", "", {"temperror": "tempfail"}, "tempfail", "dns temperror"),
    ("pass", "temperror", "temperror", "reject", {"temperror": "tempfail"}, "tempfail",
     "dns temperror"),
    ("none", "none", "fail", "reject", {"temperror": "tempfail"}, "reject", "dmarc policy reject"),
    ("permerror", "permerror", "permerror", "", {}, "accept", ""),
])
def test_decide_table(spf, dkim, dmarc, policy, settings, action, reason):
    result = AuthResult(spf=spf, dkim=dkim, dmarc=dmarc, arc="none", dmarc_policy=policy,
                        dmarc_disposition=policy if dmarc == "fail" else "",
                        header_value="x", authserv_id=AUTHSERV)
    decision = decide(result, AuthSettings(**settings))
    assert (decision.action, decision.reason) == (action, reason)
