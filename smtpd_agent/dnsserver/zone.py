"""Zones and answers, without I/O: records -> Zone, (query, Zone) -> response.

The records come from `domains.records.delegated_zone_records`, the same
builders that print a self-managed domain's records, so what we serve and what
`domain add` prints cannot drift apart. Answers follow RFC 1034 4.3.2 for an
authoritative server with no recursion and no delegations below the apex.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

from ..config import Settings
from ..domains.records import TXT_CHUNK, DnsRecord, nameservers

IN = dns.rdataclass.IN


@dataclass(frozen=True)
class Soa:
    mname: str
    rname: str
    serial: int
    refresh: int
    retry: int
    expire: int
    minimum: int
    ttl: int

    def rdata(self) -> dns.rdata.Rdata:
        return dns.rdata.from_text(
            IN, dns.rdatatype.SOA,
            f"{self.mname}. {self.rname}. {self.serial} {self.refresh} {self.retry} "
            f"{self.expire} {self.minimum}")


def soa_for(settings: Settings, serial: int) -> Soa:
    server = settings.dns_server
    rname = server.soa_rname or f"hostmaster.{settings.server.default_domain}"
    return Soa(nameservers(settings)[0], rname, serial, server.soa_refresh, server.soa_retry,
               server.soa_expire, server.soa_minimum, server.ttl)


@dataclass(frozen=True)
class Zone:
    """One zone's records by (owner, type), every name that exists (with the empty
    non-terminals, RFC 8020), and its SOA."""

    origin: dns.name.Name
    rrsets: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], dns.rrset.RRset]
    names: frozenset[dns.name.Name]
    soa: Soa

    def soa_rrset(self, negative: bool = False) -> dns.rrset.RRset:
        # RFC 2308 3: a negative answer's SOA TTL is min(SOA TTL, SOA MINIMUM)
        ttl = min(self.soa.ttl, self.soa.minimum) if negative else self.soa.ttl
        return dns.rrset.from_rdata(self.origin, ttl, self.soa.rdata())

    def capped(self, ttl: int) -> Zone:
        """The same zone with no TTL above `ttl` (RFC 8767 4: a stale answer's TTL is short,
        so resolvers come back soon for the fresh one)."""
        soa = replace(self.soa, ttl=min(self.soa.ttl, ttl), minimum=min(self.soa.minimum, ttl))
        rrsets = {key: dns.rrset.from_rdata_list(rrset.name, min(rrset.ttl, ttl), list(rrset))
                  for key, rrset in self.rrsets.items()}
        zone = Zone(self.origin, rrsets, self.names, soa)
        rrsets[(self.origin, dns.rdatatype.SOA)] = zone.soa_rrset()
        return zone


def zone_hash(records: Iterable[DnsRecord]) -> str:
    """Digest of the records without the SOA: the serial is bumped when it changes."""
    lines = sorted(r.zone_line() for r in records)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def record_rdata(record: DnsRecord) -> dns.rdata.Rdata:
    if record.type == "TXT":
        data = record.value.encode()
        # RFC 1035 3.3.14: several character-strings of at most 255 octets (RSA keys)
        chunks = [data[i:i + TXT_CHUNK] for i in range(0, len(data), TXT_CHUNK)] or [b""]
        return dns.rdtypes.ANY.TXT.TXT(IN, dns.rdatatype.TXT, chunks)
    text = {"MX": f"{record.priority} {record.value}.", "NS": f"{record.value}.",
            "CNAME": f"{record.value}."}.get(record.type, record.value)
    return dns.rdata.from_text(IN, dns.rdatatype.from_text(record.type), text)


def build_zone(origin: str, records: Iterable[DnsRecord], soa: Soa) -> Zone:
    apex = dns.name.from_text(origin)
    rrsets: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], dns.rrset.RRset] = {}
    names = {apex}
    for record in records:
        owner = dns.name.from_text(record.name)
        if not owner.is_subdomain(apex):
            continue  # never answer for a name outside the zone
        rdtype = dns.rdatatype.from_text(record.type)
        rrset = rrsets.setdefault((owner, rdtype), dns.rrset.RRset(owner, IN, rdtype))
        rrset.add(record_rdata(record), record.ttl)
        while owner != apex:  # the owner and every empty non-terminal above it exist
            names.add(owner)
            owner = owner.parent()
    zone = Zone(apex, rrsets, frozenset(names), soa)
    rrsets[(apex, dns.rdatatype.SOA)] = zone.soa_rrset()
    return zone


def find_origin(qname: dns.name.Name, origins: set[dns.name.Name] | frozenset[dns.name.Name]
                ) -> dns.name.Name | None:
    """The closest enclosing zone of ours, or None (then the answer is REFUSED)."""
    name = qname
    while True:
        if name in origins:
            return name
        if name == dns.name.root or len(name) <= 1:
            return None
        name = name.parent()


def precheck(query: dns.message.Message) -> int | None:
    """An error rcode for a query we do not answer from a zone, else None."""
    if query.opcode() != dns.opcode.QUERY:
        return dns.rcode.NOTIMP
    if len(query.question) != 1:
        return dns.rcode.FORMERR
    if query.edns > 0:
        return dns.rcode.BADVERS  # RFC 6891 6.1.3: we speak EDNS version 0
    if query.question[0].rdclass != IN:
        return dns.rcode.REFUSED
    if query.question[0].rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
        return dns.rcode.REFUSED  # no zone transfers: the zones live in Postgres, not here
    return None


def respond(query: dns.message.Message, zone: Zone | None, payload: int) -> dns.message.Message:
    """The answer to one well-formed query; zone None: the name is not ours."""
    response = dns.message.make_response(query, our_payload=payload)
    response.flags &= ~dns.flags.RA  # no recursion, ever (RFC 1035 4.1.1)
    rcode = precheck(query)
    if rcode is not None:
        response.set_rcode(rcode)
        return response
    if zone is None:
        response.set_rcode(dns.rcode.REFUSED)
        return response
    question = query.question[0]
    qname, qtype = question.name, question.rdtype
    response.flags |= dns.flags.AA
    if qtype == dns.rdatatype.ANY:
        # RFC 8482 4.2: one synthesized HINFO instead of everything (no amplification)
        response.answer.append(dns.rrset.from_text(qname, zone.soa.ttl, IN, "HINFO",
                                                   '"RFC8482" ""'))
        return response
    found = zone.rrsets.get((qname, qtype))
    if found is not None:
        response.answer.append(found)
        return response
    cname = zone.rrsets.get((qname, dns.rdatatype.CNAME))
    if cname is not None:
        response.answer.append(cname)  # its target lies outside our zones: no chasing
        return response
    if qname not in zone.names:
        response.set_rcode(dns.rcode.NXDOMAIN)
    response.authority.append(zone.soa_rrset(negative=True))
    return response


def udp_limit(query: dns.message.Message, payload: int) -> int:
    """Largest UDP answer: 512 without EDNS (RFC 1035 4.2.1), else the smaller of the
    client's and our payload size (RFC 6891 6.2.5)."""
    if query.edns < 0:
        return 512
    return max(512, min(query.payload, payload))


def to_wire(query: dns.message.Message, response: dns.message.Message, limit: int) -> bytes:
    """The response, or an empty one with TC set when it does not fit (RFC 2181 9)."""
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        truncated = dns.message.make_response(query, our_payload=limit)
        truncated.flags = response.flags | dns.flags.TC
        truncated.set_rcode(response.rcode())
        return truncated.to_wire(max_size=limit)
