"""`domain check`: does the DNS say what records.py asked for? One verdict per record.

Every record is resolved through the server's shared resolver (configured
nameservers, TTL cache, one error model). SPF and DMARC records are also
validated as the receivers on the internet will see them, with checkdmarc:
syntax, the 10-DNS-lookup limit (RFC 7208 4.6.4), one record per name (RFC
7208 3.2, RFC 7489 6.6.3), known tags and values. checkdmarc resolves the
includes itself, synchronously: it gets a dnspython resolver with *our*
nameservers (never the system's when some are configured) and runs in a thread.

A DNS timeout or SERVFAIL is `temperror`, never `fail`: an outage must not
degrade a domain whose records are fine.

A delegated domain is verified by the parent zone alone: the NS delegation and
an ownership TXT next to it (`_smtpd-agent.<parent>`, records.py). A name we
serve can never prove anything: our DNS server answers for every zone delegated
to it, including a stale delegation or one a workspace merely claimed, and it
serves no ownership records.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import checkdmarc.utils
import dns.exception
import dns.resolver
import structlog
from checkdmarc.dmarc import DMARCError, parse_dmarc_record
from checkdmarc.spf import SPFError, SPFTooManyDNSLookups, parse_spf_record

from ..config import Settings
from ..dns import DnsTempError, Resolver, parse_nameserver
from .hosts import mx_hosts
from .records import DnsRecord, RecordSet, nameservers, spf_hosts_name

log = structlog.get_logger(__name__)

Status = Literal["pass", "fail", "temperror"]
POLICY_STRENGTH = {"none": 0, "quarantine": 1, "reject": 2}
SPF_LOOKUP_LIMIT = 10  # RFC 7208 4.6.4


@dataclass(frozen=True)
class RecordCheck:
    record: DnsRecord
    status: Status
    found: tuple[str, ...] = ()
    problem: str = ""
    fix: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return f"{self.record.type} {self.record.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.record.name, "type": self.record.type,
                "purpose": self.record.purpose, "publisher": self.record.publisher,
                "required": self.record.required, "expected": expected_text(self.record),
                "found": list(self.found), "status": self.status, "problem": self.problem,
                "fix": self.fix, "notes": list(self.notes)}

    def line(self) -> str:
        found = ", ".join(self.found) if self.found else "(nothing)"
        optional = ("" if self.record.required else " (operator, not required)"
                    if self.record.publisher == "operator" else " (recommended, not required)")
        text = (f"{self.status.upper():<9} {self.record.type:<5} {self.record.name}{optional}  "
                f"expected: {expected_text(self.record)}  found: {found}")
        if self.problem:
            text += f"  problem: {self.problem}"
        if self.fix:
            text += f"  fix: {self.fix}"
        for note in self.notes:
            text += f"  note: {note}"
        return text


@dataclass(frozen=True)
class CheckReport:
    domain: str
    checks: tuple[RecordCheck, ...]

    @property
    def required(self) -> list[RecordCheck]:
        return [c for c in self.checks if c.record.required]

    @property
    def passed(self) -> bool:
        return all(c.status == "pass" for c in self.required)

    @property
    def failing(self) -> list[str]:
        """Records that answered wrong; a temperror is not among them."""
        return [c.label for c in self.required if c.status == "fail"]

    @property
    def temperror(self) -> bool:
        return any(c.status == "temperror" for c in self.required)


def expected_text(record: DnsRecord) -> str:
    if record.type == "MX":
        return f"{record.priority} {record.value}"
    if record.type == "TXT":
        return f'"{record.value}"'
    return record.value


def publish(record: DnsRecord) -> str:
    return f"publish {record.type} {record.name} {expected_text(record)}"


def dkim_tags(text: str) -> dict[str, str]:
    """RFC 6376 3.2 tag list; whitespace inside values (split TXT strings) is dropped."""
    tags = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags[name.strip().lower()] = re.sub(r"\s+", "", value)
    return tags


class DomainChecker:
    """Checks a RecordSet against the DNS; see the module docstring."""

    def __init__(self, resolver: Resolver, settings: Settings) -> None:
        self.resolver = resolver
        self.settings = settings
        sync = dns.resolver.Resolver(configure=not settings.dns.nameservers)
        if settings.dns.nameservers:
            sync.nameservers = [parse_nameserver(s) for s in settings.dns.nameservers]
        sync.lifetime = sync.timeout = settings.dns.timeout
        self._sync = sync

    async def check(self, record_set: RecordSet) -> CheckReport:
        # checkdmarc keeps a process-wide answer cache keyed by name alone; a re-check must
        # see today's DNS, not what it saw an hour ago (our own resolver honours TTLs).
        checkdmarc.utils.DNS_CACHE.clear()
        # concurrently: with a dead nameserver, ten records cost one timeout, not ten
        # operator-published records (hosted DKIM keys) are checked and shown too, but only
        # the customer's records decide verification: the customer cannot fix ours
        checks = await asyncio.gather(*(self._safe_check(r) for r in record_set.records))
        if record_set.delegated:  # everything the owner publishes goes in the parent zone
            checks = [replace(c, fix=f"{c.fix} in the parent zone")
                      if c.record.purpose == "ownership" and c.fix else c for c in checks]
        report = CheckReport(record_set.domain, tuple(checks))
        for check in report.checks:
            if check.status != "pass":
                log.info("domain.record_failed", domain=record_set.domain, record=check.label,
                         status=check.status, problem=check.problem)
        return report

    async def _safe_check(self, record: DnsRecord) -> RecordCheck:
        try:
            check = await self._check(record)
            if record.publisher == "operator" and check.fix:
                check = replace(check, fix="the operator (not the domain's owner) must "
                                + check.fix)
            return check
        except DnsTempError as error:
            return RecordCheck(record, "temperror", problem=f"DNS error: {error}",
                               fix="run the check again later")

    async def _check(self, record: DnsRecord) -> RecordCheck:
        if record.type == "MX":
            return await self._check_mx(record)
        if record.type == "CNAME":
            return await self._check_cname(record)
        if record.type == "NS":
            return await self._check_ns(record)
        if record.type in ("A", "AAAA"):
            return await self._check_address(record)
        if record.purpose in ("spf", "mail-from-spf", "spf-hosts"):
            return await self._check_spf(record)
        if record.purpose == "dmarc":
            return await self._check_dmarc(record)
        if record.purpose == "dkim":
            return await self._check_dkim(record)
        return await self._check_txt_exact(record)

    async def _check_mx(self, record: DnsRecord) -> RecordCheck:
        found = await self.resolver.mx(record.name)
        shown = tuple(f"{p} {h}" for p, h in sorted(found))
        hosts = {h.lower() for _, h in found}
        if record.value.lower() in hosts:
            ours = set(mx_hosts(self.settings))
            foreign = sorted(hosts - ours)
            notes = (f"MX host(s) {', '.join(foreign)} are not ours: mail they take never "
                     "reaches the agents",) if foreign else ()
            return RecordCheck(record, "pass", shown, notes=notes)
        return RecordCheck(record, "fail", shown,
                           problem=f"{record.value} is not an MX host of {record.name}",
                           fix=publish(record))

    async def _check_cname(self, record: DnsRecord) -> RecordCheck:
        answer = await self.resolver.query(record.name, "CNAME")
        found = tuple(r.target.to_text(omit_final_dot=True).lower() for r in answer.records)
        if record.value in found:
            return RecordCheck(record, "pass", found)
        return RecordCheck(record, "fail", found, problem="the CNAME does not point at our "
                           "key", fix=publish(record) + (" (and remove the other record)"
                                                         if found else ""))

    async def _check_ns(self, record: DnsRecord) -> RecordCheck:
        """Delegation: a resolver following the parent's referral finds our name servers.

        Asked through the resolver, as receivers will: the NS set comes from our own
        servers once the parent delegates to them, and is missing (NXDOMAIN or another
        NS set) while it does not.
        """
        answer = await self.resolver.query(record.name, "NS")
        found = tuple(sorted(r.target.to_text(omit_final_dot=True).lower()
                             for r in answer.records))
        if record.value in found:
            foreign = sorted(set(found) - set(nameservers(self.settings)))
            notes = (f"name server(s) {', '.join(foreign)} are not ours: resolvers asking "
                     "them get other answers",) if foreign else ()
            return RecordCheck(record, "pass", found, notes=notes)
        return RecordCheck(record, "fail", found,
                           problem=f"{record.name} is not delegated to {record.value}",
                           fix=publish(record) + " in the parent zone")

    async def _check_address(self, record: DnsRecord) -> RecordCheck:
        found = tuple(await (self.resolver.aaaa(record.name) if record.type == "AAAA"
                             else self.resolver.a(record.name)))
        if record.value in found:
            return RecordCheck(record, "pass", found)
        return RecordCheck(record, "fail", found, problem="the glue address is missing",
                           fix=publish(record) + " in the parent zone")

    async def _txts(self, name: str) -> list[str]:
        return [t.decode("utf-8", "replace") for t in await self.resolver.txt(name)]

    async def _check_txt_exact(self, record: DnsRecord) -> RecordCheck:
        found = tuple(await self._txts(record.name))
        if any(t.strip() == record.value for t in found):
            return RecordCheck(record, "pass", found)
        return RecordCheck(record, "fail", found, problem="the expected TXT record is missing",
                           fix=publish(record))

    async def _check_dkim(self, record: DnsRecord) -> RecordCheck:
        found = tuple(await self._txts(record.name))
        want = dkim_tags(record.value)
        for text in found:
            tags = dkim_tags(text)
            if tags.get("p") == want["p"] and tags.get("k", "rsa") == want["k"]:
                return RecordCheck(record, "pass", found)
        problem = ("no DKIM key record at this selector" if not found
                   else "the record does not carry our public key")
        return RecordCheck(record, "fail", found, problem=problem, fix=publish(record))

    async def _check_spf(self, record: DnsRecord) -> RecordCheck:
        found = tuple(await self._txts(record.name))
        spf = [t for t in found if t.strip().lower() == "v=spf1"
               or t.strip().lower().startswith("v=spf1 ")]
        if not spf:
            return RecordCheck(record, "fail", found, problem="no SPF record",
                               fix=publish(record))
        if len(spf) > 1:
            return RecordCheck(
                record, "fail", found,
                problem=f"{len(spf)} SPF records: RFC 7208 3.2 allows one, receivers treat "
                        "several as a permanent error (SPF fails for every message)",
                fix=f"merge them into one TXT record and delete the others; ours: "
                    f'"{record.value}"')
        text = spf[0].strip()
        try:
            parsed = await asyncio.to_thread(parse_spf_record, text, record.name,
                                             resolver=self._sync)
        except SPFTooManyDNSLookups as error:
            lookups = (error.data or {}).get("dns_lookups", "more than 10")
            return RecordCheck(
                record, "fail", found,
                problem=f"the record needs {lookups} DNS lookups; RFC 7208 4.6.4 allows "
                        f"{SPF_LOOKUP_LIMIT}, beyond that receivers return permerror",
                fix="remove include:/a/mx/exists/ptr terms or replace them with ip4:/ip6: "
                    f"ranges until at most {SPF_LOOKUP_LIMIT} lookups remain; keep "
                    f"include:{spf_hosts_name(self.settings)}")
        except SPFError as error:
            return RecordCheck(record, "fail", found, problem=f"invalid SPF record: {error}",
                               fix=f'replace it with "{record.value}"')
        except dns.exception.DNSException as error:
            raise DnsTempError(f"SPF include lookup: {error}") from error
        notes = tuple(str(w) for w in parsed.get("warnings", []))
        ours = f"include:{spf_hosts_name(self.settings)}"
        terms = [t.lower() for t in text.split()]
        if ours not in terms and text != record.value:
            return RecordCheck(record, "fail", found, notes=notes,
                               problem="the SPF record does not authorize our sending hosts",
                               fix=f"add {ours} before the final all term")
        if not any(t in ("-all", "~all") for t in terms) and "redirect=" not in text:
            notes += ("the record does not end in -all or ~all: anyone may send as the domain",)
        return RecordCheck(record, "pass", found, notes=notes)

    async def _check_dmarc(self, record: DnsRecord) -> RecordCheck:
        found = tuple(await self._txts(record.name))
        dmarc = [t for t in found if re.match(r"^\s*v\s*=\s*DMARC1\s*(;|$)", t, re.IGNORECASE)]
        if not dmarc:
            return RecordCheck(record, "fail", found, problem="no DMARC record",
                               fix=publish(record))
        if len(dmarc) > 1:
            return RecordCheck(
                record, "fail", found,
                problem=f"{len(dmarc)} DMARC records: receivers ignore them all "
                        "(RFC 7489 6.6.3), as if the domain had no policy",
                fix=f'keep one TXT record: "{record.value}"')
        domain = record.name.removeprefix("_dmarc.")
        try:
            parsed = await asyncio.to_thread(parse_dmarc_record, dmarc[0], domain,
                                             resolver=self._sync)
        except DMARCError as error:
            return RecordCheck(record, "fail", found, problem=f"invalid DMARC record: {error}",
                               fix=f'replace it with "{record.value}"')
        except dns.exception.DNSException as error:
            raise DnsTempError(f"DMARC report destination lookup: {error}") from error
        notes = tuple(str(w) for w in parsed.get("warnings", []))
        policy = parsed["tags"]["p"]["value"]
        wanted = self.settings.domains.dmarc_policy
        if POLICY_STRENGTH.get(policy, 0) < POLICY_STRENGTH[wanted]:
            return RecordCheck(record, "fail", found, notes=notes,
                               problem=f"policy p={policy} is weaker than p={wanted}",
                               fix=f'replace it with "{record.value}"')
        return RecordCheck(record, "pass", found, notes=notes)
