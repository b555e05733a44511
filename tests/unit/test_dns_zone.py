"""The delegated zone and the answers, without sockets: records, responses, rate limit,
MTA-STS policy; tables of (query, expected answer)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

from smtpd_agent.config import load_settings
from smtpd_agent.dnsserver.server import ConnectionSlots, RateLimiter, served_records, source_key
from smtpd_agent.dnsserver.zone import (
    build_zone,
    find_origin,
    respond,
    soa_for,
    to_wire,
    udp_limit,
    zone_hash,
)
from smtpd_agent.domains.keys import DkimKey
from smtpd_agent.domains.mta_sts import mta_sts_route, policy_for, sts_txt, tlsrpt_txt
from smtpd_agent.domains.records import (
    custom_domain_records,
    delegated_domain_records,
    delegated_zone_records,
)

ZONE = "mail.acme.example"


def settings(tmp_path: Path, **overrides: object):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    return load_settings(path=empty, env={}, overrides={
        "server.default_domain": "agents.test", **overrides})


def key(selector: str, algorithm: str = "rsa-2048", public: str = "A" * 392) -> DkimKey:
    return DkimKey(1, 1, ZONE, selector, algorithm, public,  # type: ignore[arg-type]
                   datetime.now(UTC), None)


@pytest.fixture
def zone(tmp_path: Path):
    config = settings(tmp_path)
    records = delegated_zone_records(config, ZONE, [key("sa-1-rsa"),
                                                    key("sa-1-ed25519", "ed25519", "B" * 44)])
    return build_zone(ZONE, records, soa_for(config, 7))


def ask(zone, name: str, rdtype: str, **kwargs: object) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kwargs)
    return respond(query, zone, 1232)


def texts(response: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in response.answer for rd in rrset)


@pytest.mark.parametrize("name, rdtype, rcode, answer", [
    (ZONE, "SOA", "NOERROR", ["ns1.agents.test. hostmaster.agents.test. 7 3600 600 1209600 300"]),
    (ZONE, "NS", "NOERROR", ["ns1.agents.test.", "ns2.agents.test."]),
    (ZONE, "MX", "NOERROR", ["10 mx1.agents.test.", "20 mx2.agents.test."]),
    (ZONE, "TXT", "NOERROR", ['"v=spf1 include:_spf.agents.test -all"']),
    (f"mail.{ZONE}", "MX", "NOERROR", ["10 mx1.agents.test.", "20 mx2.agents.test."]),
    (f"mail.{ZONE}", "TXT", "NOERROR", ['"v=spf1 include:_spf.agents.test -all"']),
    (f"_dmarc.{ZONE}", "TXT", "NOERROR", ['"v=DMARC1; p=quarantine"']),
    (f"sa-1-ed25519._domainkey.{ZONE}", "TXT", "NOERROR",
     ['"v=DKIM1; k=ed25519; p=' + "B" * 44 + '"']),
    (f"_smtp._tls.{ZONE}", "TXT", "NOERROR",
     ['"v=TLSRPTv1; rua=mailto:tls-reports@agents.test"']),
    (f"mta-sts.{ZONE}", "A", "NOERROR", ["mta-sts.agents.test."]),  # the CNAME
    (f"_mta-sts.{ZONE}", "TXT", "NOERROR", None),
    (ZONE, "AAAA", "NOERROR", []),  # NODATA
    (f"_domainkey.{ZONE}", "TXT", "NOERROR", []),  # empty non-terminal: NODATA, not NXDOMAIN
    (f"nothing.{ZONE}", "A", "NXDOMAIN", []),
    ("Mail.ACME.example.", "MX", "NOERROR", ["10 mx1.agents.test.", "20 mx2.agents.test."]),
])
def test_answers_from_the_zone(zone, name: str, rdtype: str, rcode: str,
                               answer: list[str] | None) -> None:
    response = ask(zone, name, rdtype)
    assert dns.rcode.to_text(response.rcode()) == rcode
    assert response.flags & dns.flags.AA and not response.flags & dns.flags.RA
    if answer is not None:
        assert texts(response) == sorted(answer)
    if not response.answer:  # negative answers carry the SOA (RFC 2308), TTL = minimum
        [soa] = response.authority
        assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == 300


def test_long_dkim_key_is_split_into_255_octet_strings(zone) -> None:
    [rrset] = ask(zone, f"sa-1-rsa._domainkey.{ZONE}", "TXT").answer
    [rdata] = rrset
    assert [len(s) for s in rdata.strings] == [255, len(b"v=DKIM1; k=rsa; p=" + b"A" * 392) - 255]


@pytest.mark.parametrize("build, rcode", [
    (lambda: dns.message.make_query("example.com", "A"), dns.rcode.REFUSED),
    (lambda: dns.message.make_query("agents.test", "SOA"), dns.rcode.REFUSED),  # parent: not ours
    (lambda: dns.message.make_query(ZONE, "TXT", rdclass="CH"), dns.rcode.REFUSED),
    (lambda: dns.message.make_query(ZONE, "SOA", use_edns=1), dns.rcode.BADVERS),
    (lambda: dns.message.make_query(ZONE, "AXFR"), dns.rcode.REFUSED),
    (lambda: _with_opcode(dns.opcode.NOTIFY), dns.rcode.NOTIMP),
    (lambda: _two_questions(), dns.rcode.FORMERR),
])
def test_queries_we_do_not_answer(zone, build, rcode: int) -> None:
    query = build()
    origin = find_origin(query.question[0].name, {zone.origin}) if query.question else None
    response = respond(query, zone if origin else None, 1232)
    assert response.rcode() == rcode
    assert not response.answer and not response.flags & dns.flags.AA


def _with_opcode(opcode: int) -> dns.message.Message:
    query = dns.message.make_query(ZONE, "SOA")
    query.set_opcode(opcode)
    return query


def _two_questions() -> dns.message.Message:
    query = dns.message.make_query(ZONE, "SOA")
    query.question.append(dns.message.make_query(ZONE, "NS").question[0])
    return query


def test_any_gets_rfc8482_hinfo(zone) -> None:
    assert texts(ask(zone, ZONE, "ANY")) == ['"RFC8482" ""']


def test_truncation_over_udp_and_edns_payload(tmp_path: Path) -> None:
    config = settings(tmp_path, **{"dns_server.nameservers": [
        f"ns-with-a-rather-long-name-{i:02d}.agents.test" for i in range(14)]})
    zone = build_zone(ZONE, delegated_zone_records(config, ZONE, []), soa_for(config, 1))
    plain = dns.message.make_query(ZONE, "NS", use_edns=False)
    edns = dns.message.make_query(ZONE, "NS", use_edns=0, payload=4096)
    assert udp_limit(plain, 1232) == 512 and udp_limit(edns, 1232) == 1232
    small = dns.message.from_wire(to_wire(plain, respond(plain, zone, 1232), 512))
    assert small.flags & dns.flags.TC and not small.answer
    full = dns.message.from_wire(to_wire(edns, respond(edns, zone, 1232), 1232))
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == 14 and full.edns == 0


def test_zone_hash_changes_with_content_only(tmp_path: Path) -> None:
    config = settings(tmp_path)
    one = delegated_zone_records(config, ZONE, [key("a")])
    assert zone_hash(one) == zone_hash(tuple(reversed(one)))
    assert zone_hash(one) != zone_hash(delegated_zone_records(config, ZONE, [key("b")]))
    moved = settings(tmp_path, **{"domains.mx_primary": "mx9.agents.test"})
    assert zone_hash(one) != zone_hash(delegated_zone_records(moved, ZONE, [key("a")]))


def test_mta_sts_policy_and_records_agree(tmp_path: Path) -> None:
    config = settings(tmp_path, **{"mta_sts.mode": "enforce", "mta_sts.max_age": 86400,
                                   "mta_sts.tlsrpt_rua": "mailto:tls@ops.example"})
    policy = policy_for(config)
    assert policy.text() == ("version: STSv1\r\nmode: enforce\r\nmx: mx1.agents.test\r\n"
                             "mx: mx2.agents.test\r\nmax_age: 86400\r\n")
    assert sts_txt(policy) == f"v=STSv1; id={policy.id}" and policy.id.isalnum()
    assert tlsrpt_txt(config) == "v=TLSRPTv1; rua=mailto:tls@ops.example"
    # the id follows the policy: another MX set, another id; the same policy, the same id
    moved = settings(tmp_path, **{"domains.mx_backup": "mx3.agents.test", "mta_sts.mode":
                                  "enforce", "mta_sts.max_age": 86400})
    assert policy_for(moved).id != policy.id
    assert policy_for(settings(tmp_path, **{"mta_sts.mode": "enforce",
                                            "mta_sts.max_age": 86400})).id == policy.id
    # self-managed domains get the same records in `domain add` output, not required
    custom = custom_domain_records(config, ZONE, "acme", "pending", "tok", [])
    sts = {r.purpose: r for r in custom.records if r.purpose in ("mta-sts", "tls-rpt",
                                                                 "mta-sts-host")}
    assert sts["mta-sts"].value == sts_txt(policy) and not sts["mta-sts"].required
    assert sts["mta-sts-host"].value == "mta-sts.agents.test"


def test_delegated_add_prints_ns_glue_and_the_parent_ownership_record(tmp_path: Path) -> None:
    plain = delegated_domain_records(settings(tmp_path), ZONE, "acme", "pending", "tok")
    assert [(r.name, r.type, r.value) for r in plain.records] == [
        (ZONE, "NS", "ns1.agents.test"), (ZONE, "NS", "ns2.agents.test"),
        ("_smtpd-agent.acme.example", "TXT", "smtpd-agent-verification=tok")]
    assert plain.zone_snippet().splitlines()[-1] == \
        '_smtpd-agent.acme.example.\t3600\tIN\tTXT\t"smtpd-agent-verification=tok"'
    inside = settings(tmp_path, **{"dns_server.nameservers": [f"ns1.{ZONE}", "ns2.agents.test"],
                                   "dns_server.glue": [f"ns1.{ZONE}=192.0.2.53"]})
    records = delegated_domain_records(inside, ZONE, "acme", "pending", "tok").records
    assert [(r.name, r.type, r.value) for r in records if r.purpose == "glue"] == [
        (f"ns1.{ZONE}", "A", "192.0.2.53")]


def test_the_ownership_proof_of_a_delegated_domain_is_never_ours_to_serve(
        tmp_path: Path) -> None:
    """It lies outside the zone (resolvers ask the parent), and no zone we build holds one:
    a pending zone serves its delegation only, a verified one everything but ownership."""
    config = settings(tmp_path, **{"dns_server.nameservers": [f"ns1.{ZONE}", "ns2.agents.test"],
                                   "dns_server.glue": [f"ns1.{ZONE}=192.0.2.53"]})
    [ownership] = [r for r in delegated_domain_records(config, ZONE, "acme", "pending",
                                                       "tok").records
                   if r.purpose == "ownership"]
    assert not dns.name.from_text(ownership.name).is_subdomain(dns.name.from_text(ZONE))
    full = delegated_zone_records(config, ZONE, [key("sa-1-rsa")])
    pending = served_records(full, verified=False)
    assert {(r.purpose, r.type) for r in pending} == {("delegation", "NS"), ("glue", "A")}
    forged = (*full, replace(ownership, name=f"_smtpd-agent.{ZONE}"))
    assert served_records(forged, verified=True) == full
    zone = build_zone(ZONE, pending, soa_for(config, 1))
    for name, rdtype in ((ZONE, "MX"), (ZONE, "TXT"), (f"sa-1-rsa._domainkey.{ZONE}", "TXT"),
                         (f"_dmarc.{ZONE}", "TXT"), (f"mail.{ZONE}", "MX")):
        response = ask(zone, name, rdtype)
        assert not response.answer, (name, rdtype)
    assert ask(zone, ZONE, "NS").answer and ask(zone, f"ns1.{ZONE}", "A").answer


def test_a_stale_zone_keeps_its_records_at_a_short_ttl(zone) -> None:
    stale = zone.capped(30)
    assert ask(stale, ZONE, "MX").answer[0].ttl == 30 and ask(zone, ZONE, "MX").answer[0].ttl == 300
    assert sorted(r.to_text() for r in ask(stale, ZONE, "MX").answer[0]) == sorted(
        r.to_text() for r in ask(zone, ZONE, "MX").answer[0])
    assert ask(stale, ZONE, "SOA").answer[0][0].serial == 7
    assert ask(stale, f"nothing.{ZONE}", "A").authority[0].ttl == 30


@pytest.mark.parametrize(("address", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("fe80::1%eth0", "fe80::/64"),
])
def test_per_source_limits_key_ipv6_by_its_64(address: str, key: str) -> None:
    assert source_key(address) == key


def test_tcp_slots_are_capped_per_source_and_in_total() -> None:
    slots = ConnectionSlots(total=5, per_source=2)
    assert [slots.acquire("a") for _ in range(3)] == [None, None, "per_source"]
    assert [slots.acquire("b") for _ in range(2)] == [None, None]
    assert slots.acquire("c") is None and slots.acquire("d") == "total"
    slots.release("a")
    assert slots.acquire("a") is None and slots.open == {"a": 2, "b": 2, "c": 1}


def test_rate_limiter_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0], max_sources=2)
    assert [limiter.allow("a") for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow("b")  # another source has its own bucket
    now[0] = 1.0  # two tokens back
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    limiter.allow("c")  # bounded memory: the least recently seen source is forgotten
    assert set(limiter._buckets) == {"a", "c"}
    assert RateLimiter(rate=0, burst=1).allow("x")


@pytest.mark.parametrize("host, path, status", [
    ("mta-sts.agents.test", "/.well-known/mta-sts.txt", 200),
    ("MTA-STS.acme.agents.test:443", "/.well-known/mta-sts.txt", 200),  # a workspace domain
    ("mta-sts.agents.test", "/.well-known/other.txt", 404),
    ("www.agents.test", "/.well-known/mta-sts.txt", 404),
    ("[::1]:443", "/.well-known/mta-sts.txt", 404),
])
async def test_policy_route_for_our_own_domains(tmp_path: Path, host: str, path: str,
                                                status: int) -> None:
    """Hosts under the default domain need no database (custom ones: test_delegation)."""
    config = settings(tmp_path)
    reply = await mta_sts_route(None, config, host, path)  # type: ignore[arg-type]
    assert reply.status == status
    if status == 200:
        assert reply.content_type == "text/plain"
        assert reply.body.decode() == policy_for(config).text()


@pytest.mark.parametrize("qname, origin", [
    (ZONE, ZONE), (f"a.b.c.{ZONE}", ZONE), ("acme.example", None), ("example", None),
    (f"x.other.{ZONE}", "other." + ZONE),  # the closest enclosing zone wins
])
def test_find_origin(qname: str, origin: str | None) -> None:
    origins = {dns.name.from_text(ZONE), dns.name.from_text("other." + ZONE)}
    found = find_origin(dns.name.from_text(qname), origins)
    assert found == (dns.name.from_text(origin) if origin else None)
