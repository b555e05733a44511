"""DMARC (RFC 7489, RFC 9989) for the authenticate stage: does the visible From domain check out?

Runs after SPF and DKIM, from their results: find the policy of the
RFC5322.From domain, check whether SPF or a DKIM signature passed *for an
aligned domain* (relaxed: same organizational domain; strict: same name), and
say which policy applies (p for the domain itself, sp for its subdomains,
pct sampling). The stage returns a result; `auth.decide()` turns it into
accept / quarantine / reject.

Discovery goes through our async resolver (shared cache, temperror model);
checkdmarc parses the record, and its bundled Public Suffix List (the
`publicsuffixlist` package, offline) gives the organizational domain. checkdmarc
implements the RFC 9989 tree walk only over its own synchronous resolver, so
the walk is re-done here, step for step, with ours (`auth.dmarc_discovery`).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from checkdmarc.dmarc import DMARCError, parse_dmarc_record
from checkdmarc.utils import get_base_domain

from ..dns import DnsTempError, Resolver
from .dkim import DkimResult
from .spf import SpfResult

log = structlog.get_logger(__name__)

DmarcStatus = Literal["pass", "fail", "none", "temperror", "permerror"]
Policy = Literal["none", "quarantine", "reject"]
DMARC_RECORD = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)", re.IGNORECASE)
# RFC 9989 section 4.10: at most 8 lookups; names longer than that skip to the last 7 labels.
MAX_WALK = 8


@dataclass(frozen=True)
class DmarcRecord:
    """The parts of a DMARC record a receiver acts on."""

    domain: str  # where the record was found (the _dmarc. prefix removed)
    p: Policy
    sp: Policy
    adkim: Literal["r", "s"]
    aspf: Literal["r", "s"]
    pct: int
    psd: str = ""  # RFC 9989: "y", "n" or "" (absent)
    text: str = ""


@dataclass(frozen=True)
class DmarcResult:
    result: DmarcStatus
    from_domain: str = ""
    # The policy the domain owner asked for this message (p, or sp for a subdomain),
    # and what we apply after pct sampling (RFC 7489 6.6.4): both "" without a record.
    policy: str = ""
    disposition: str = ""
    record_domain: str = ""
    org_domain: str = ""
    aligned: tuple[str, ...] = field(default=())  # "spf", "dkim" (which identifiers aligned)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["aligned"] = list(self.aligned)
        return data


def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the registrable domain per the Public Suffix List (offline copy)."""
    domain = domain.lower().rstrip(".")
    try:
        return get_base_domain(domain) or domain
    except Exception:  # noqa: BLE001 - a malformed name is its own organizational domain
        return domain


def aligned(identifier: str, from_domain: str, mode: str, org_of: dict[str, str]) -> bool:
    """RFC 7489 3.1: strict = identical names; relaxed = same organizational domain."""
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not identifier or not from_domain:
        return False
    if mode == "s":
        return identifier == from_domain
    return org_of.get(identifier, identifier) == org_of.get(from_domain, from_domain)


@functools.lru_cache(maxsize=4096)
def parse_record(text: str, domain: str) -> DmarcRecord:
    """checkdmarc validates the tags; we keep what disposition needs. Raises DMARCError.

    Cached: the parse is a pure function of the record, and checkdmarc's grammar is
    costly enough to show on the hot path for senders that mail us every second.
    """
    tags = {}
    kept = []
    for part in text.split(";"):
        name, _, value = part.partition("=")
        name = name.strip().lower()
        if name:
            tags[name] = value.strip()
        # rua/ruf are for reporting, which we do not do; checkdmarc would verify
        # their destinations with DNS queries of its own (off our resolver).
        if name not in ("rua", "ruf"):
            kept.append(part)
    parsed = parse_dmarc_record(";".join(kept), domain)["tags"]
    # pct was dropped by RFC 9989 (checkdmarc ignores it) but RFC 7489 senders still use it.
    try:
        pct = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return DmarcRecord(
        domain=domain,
        p=parsed["p"]["value"],
        sp=parsed["sp"]["value"],
        adkim=parsed["adkim"]["value"],
        aspf=parsed["aspf"]["value"],
        pct=pct,
        psd=tags.get("psd", "").lower(),
        text=text,
    )


async def fetch_record(resolver: Resolver, domain: str) -> DmarcRecord | None:
    """The DMARC record at _dmarc.<domain>, None if absent. DnsTempError and DMARCError pass up."""
    records = [r.decode("utf-8", "replace") for r in await resolver.txt(f"_dmarc.{domain}")]
    records = [r for r in records if DMARC_RECORD.match(r)]
    if not records:
        return None
    if len(records) > 1:
        # RFC 7489 6.6.3 step 2 / RFC 9989 4.10: several records are as good as none.
        return None
    return parse_record(records[0], domain)


async def discover_psl(resolver: Resolver, from_domain: str) -> tuple[DmarcRecord | None, str]:
    """RFC 7489 6.6.3: the From domain's record, else the organizational domain's."""
    org = organizational_domain(from_domain)
    record = await fetch_record(resolver, from_domain)
    if record is None and org != from_domain:
        record = await fetch_record(resolver, org)
    return record, org


async def discover_treewalk(resolver: Resolver,
                            from_domain: str) -> tuple[DmarcRecord | None, str]:
    """RFC 9989 4.10: walk from the From domain towards the root, as checkdmarc does."""
    record = await fetch_record(resolver, from_domain)
    labels = from_domain.split(".")
    walked: list[tuple[int, DmarcRecord]] = []
    if record is not None:
        walked.append((0, record))
    if record is None or record.psd not in ("y", "n"):
        start = 1 if len(labels) <= MAX_WALK else len(labels) - (MAX_WALK - 1)
        for index in range(start, len(labels)):
            found = await fetch_record(resolver, ".".join(labels[index:]))
            if found is None:
                continue
            walked.append((index, found))
            if found.psd in ("y", "n"):
                break
    # Organizational domain (RFC 9989 4.10.2): psd=n marks it; psd=y sits one label
    # above it; otherwise the record with the fewest labels.
    org = organizational_domain(from_domain)
    if walked:
        index, last = walked[-1]
        if last.psd == "y":
            org = ".".join(labels[max(index - 1, 0):])
        else:
            org = last.domain
    if record is None and walked:
        # As checkdmarc: the record with the fewest labels applies, except that under
        # a psd=y (public suffix) record, the one directly below it wins if present.
        index, record = walked[-1]
        if record.psd == "y" and len(walked) > 1 and walked[-2][0] == index - 1:
            record = walked[-2][1]
    return record, org


def _sample(policy: str, pct: int, draw: float) -> str:
    """RFC 7489 6.6.4: outside the pct sample, apply the next weaker policy."""
    if pct >= 100 or draw * 100 < pct:
        return policy
    return {"reject": "quarantine", "quarantine": "none"}.get(policy, policy)


async def evaluate_dmarc(resolver: Resolver, from_address: str | None, spf: SpfResult,
                         dkim: DkimResult, *, discovery: str = "psl",
                         draw: float | None = None) -> DmarcResult:
    """DMARC verdict from SPF and DKIM results; `draw` in [0, 1) fixes pct sampling in tests."""
    from_domain = (from_address or "").rpartition("@")[2].strip().lower().rstrip(".")
    if not from_domain or "." not in from_domain:
        return DmarcResult("permerror", reason="no usable RFC5322.From domain")
    try:
        if discovery == "treewalk":
            record, org = await discover_treewalk(resolver, from_domain)
        else:
            record, org = await discover_psl(resolver, from_domain)
    except DnsTempError as error:
        return DmarcResult("temperror", from_domain=from_domain, reason=f"policy lookup: {error}")
    except DMARCError as error:
        return DmarcResult("permerror", from_domain=from_domain, org_domain=organizational_domain(
            from_domain), reason=f"invalid record: {error}")
    if record is None:
        return DmarcResult("none", from_domain=from_domain, org_domain=org,
                           reason="no DMARC record")

    # Other identifiers' organizational domains come from the PSL in both modes
    # (a per-identifier tree walk would cost up to 8 more lookups each).
    org_of = {from_domain: org}
    identifiers = [spf.domain] + [s.domain for s in dkim.signatures]
    for identifier in identifiers:
        identifier = identifier.lower().rstrip(".")
        if identifier and identifier not in org_of:
            org_of[identifier] = organizational_domain(identifier)

    via: list[str] = []
    if spf.result == "pass" and aligned(spf.domain, from_domain, record.aspf, org_of):
        via.append("spf")
    if any(s.result == "pass" and aligned(s.domain, from_domain, record.adkim, org_of)
           for s in dkim.signatures):
        via.append("dkim")
    # The record at the From domain itself uses p; one found above it uses sp (RFC 7489 6.6.3).
    policy = record.p if record.domain == from_domain else record.sp
    common = dict(from_domain=from_domain, policy=policy, record_domain=record.domain,
                  org_domain=org, aligned=tuple(via))
    if via:
        return DmarcResult("pass", disposition="none", **common)
    # No aligned pass: if an aligned identifier could not be checked for a temporary
    # reason, we do not know yet (RFC 7489 6.6.2 / RFC 9989 temperror).
    pending = (spf.result == "temperror" and aligned(spf.domain, from_domain, record.aspf, org_of)
               ) or any(s.result == "temperror" and aligned(s.domain, from_domain, record.adkim,
                                                            org_of) for s in dkim.signatures)
    if pending:
        return DmarcResult("temperror", reason="aligned identifier had a DNS temperror",
                           **common)
    disposition = _sample(policy, record.pct, random.random() if draw is None else draw)
    reason = "no aligned SPF or DKIM pass"
    log.debug("dmarc.fail", from_domain=from_domain, policy=policy, disposition=disposition)
    return DmarcResult("fail", disposition=disposition, reason=reason, **common)
