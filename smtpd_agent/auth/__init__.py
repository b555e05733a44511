"""The authenticate stage (DESIGN.md step 3): SPF, DKIM, ARC, then DMARC, then a pure decision.

`authenticate()` does the I/O: SPF, DKIM and ARC run through one CheckRunner
(auth/runner.py: from the cache on the loop, else concurrently in bounded pools,
each under its own deadline; a missed deadline is temperror, never fail); DMARC then
combines SPF and DKIM. It returns an `AuthResult` holding the values to store
(columns spf, dkim, dmarc, arc, auth_results) and the Authentication-Results
header value. `decide()` is pure: it maps a result and the operator's policy
to an action and a reason (typed); for a refusal, smtp/replies.py's table maps
the reason to the reply, SMTP or HTTP (dmarc policy reject -> 550 5.7.1, spf fail
-> 550 5.7.23, dns temperror -> 451 4.7.0).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import structlog

from ..config import AuthSettings
from ..dns import Resolver
from ..record import InboundMessage
from . import arc, dkim, spf
from .adapters import DkimMessage
from .arc import ArcResult
from .dkim import DkimSignatureResult
from .dmarc import DmarcResult, aligned, evaluate_dmarc, organizational_domain
from .results import header_value, prepend_results, strip_our_results
from .runner import CheckRunner, own_runner
from .spf import SpfResult, spf_identity

__all__ = [
    "AuthAction", "AuthDecision", "AuthReason", "AuthResult", "CheckRunner", "authenticate",
    "decide", "prepend_results",
    "strip_our_results",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")


class AuthAction(StrEnum):
    ACCEPT = "accept"
    QUARANTINE = "quarantine"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


class AuthReason(StrEnum):
    """Short and log-safe; for a refusal, the key of its reply in smtp/replies.py."""

    NONE = ""
    DMARC_REJECT = "dmarc policy reject"
    DMARC_QUARANTINE = "dmarc policy quarantine"
    DMARC_TEMPERROR_QUARANTINE = "dmarc temperror under p=quarantine"
    DMARC_TEMPERROR_REJECT = "dmarc temperror under p=reject"
    SPF_FAIL = "spf fail"
    DNS_TEMPERROR = "dns temperror"


@dataclass(frozen=True)
class AuthResult:
    """Every verdict of one message; the str fields are the stored columns."""

    spf: str
    dkim: str
    dmarc: str
    arc: str
    dmarc_policy: str  # the owner's policy for this From domain: p, or sp for a subdomain
    header_value: str  # the Authentication-Results field body (after "Authentication-Results: ")
    authserv_id: str
    # What we apply on DMARC fail after pct sampling (RFC 7489 6.6.4): none / quarantine /
    # reject; "" when DMARC did not fail.
    dmarc_disposition: str = ""
    dkim_signatures: tuple[DkimSignatureResult, ...] = field(default=())
    spf_detail: SpfResult | None = None
    dmarc_detail: DmarcResult | None = None
    arc_detail: ArcResult | None = None
    iprev: str = ""  # "" when not computed (webhooks); the stored column

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (plain str/int/list/dict), for the store and the inbox CLI."""
        return {
            "spf": self.spf,
            "dkim": self.dkim,
            "dmarc": self.dmarc,
            "arc": self.arc,
            "iprev": self.iprev,
            "dmarc_policy": self.dmarc_policy,
            "dmarc_disposition": self.dmarc_disposition,
            "authserv_id": self.authserv_id,
            "header_value": self.header_value,
            "dkim_signatures": [s.to_dict() for s in self.dkim_signatures],
            "spf_detail": self.spf_detail.to_dict() if self.spf_detail else None,
            "dmarc_detail": self.dmarc_detail.to_dict() if self.dmarc_detail else None,
            "arc_detail": self.arc_detail.to_dict() if self.arc_detail else None,
        }

    def stamp(self, raw: bytes) -> bytes:
        """The raw message as stored: forged A-R claiming our id removed, ours first."""
        return prepend_results(raw, self.authserv_id, self.header_value)


@dataclass(frozen=True)
class AuthDecision:
    action: AuthAction
    reason: AuthReason = AuthReason.NONE


async def _deadline(check: Awaitable[T], seconds: float) -> T | None:
    """None when the check missed its deadline (the caller records temperror)."""
    try:
        async with asyncio.timeout(seconds):
            return await check
    except TimeoutError:
        return None


def _no_client_ip(identity: str, domain: str, sender: str) -> SpfResult:
    """A message posted by a provider's webhook: the connecting IP is the provider's to know
    (RFC 7208 needs it), so SPF is "none" and DMARC rests on DKIM alone."""
    return SpfResult("none", identity, domain, sender, "", reason="no client IP (webhook)")


def _aligned_with(from_address: str | None) -> Callable[[str], bool]:
    """Relaxed DMARC alignment with the From domain: which DKIM d= to verify first."""
    from_domain = (from_address or "").rpartition("@")[2].strip().lower().rstrip(".")
    org_of = {from_domain: organizational_domain(from_domain)} if from_domain else {}

    def first(domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        if domain not in org_of:
            org_of[domain] = organizational_domain(domain)
        return aligned(domain, from_domain, "r", org_of)

    return first


async def authenticate(message: InboundMessage, resolver: Resolver, settings: AuthSettings,
                       authserv_id: str, runner: CheckRunner | None = None) -> AuthResult:
    """SPF, DKIM and ARC (concurrently when they need DNS), then DMARC; never raises for DNS
    trouble. With the sender's records cached, nothing here waits for the event loop.
    The runtime passes its `runner`; one-off callers may leave it out."""
    envelope = message.envelope
    deadline = settings.timeout
    raw = message.raw
    identity, sender, domain = spf_identity(envelope.mail_from, envelope.helo)
    first = _aligned_with(message.parsed.from_address)
    limit = settings.dkim_max_signatures
    # parsed, canonicalized and body-hashed once for DKIM and ARC together; `raw` is past
    # the content step (ingress.accept_content), so its lines all end in CRLF
    shared = DkimMessage(raw, crlf=True)
    checks = [dkim.dkim_check(raw, first=first, limit=limit, shared=shared),
              arc.arc_check(raw, shared)]
    if envelope.client_ip:
        checks.append(spf.spf_check(envelope.client_ip, envelope.mail_from, envelope.helo,
                                    timeout=deadline))
    async with own_runner(runner) as run:
        found = await run.run_all(resolver, checks, deadline)
    dkim_result = found[0] if found[0] is not None else dkim.timed_out(raw, first=first,
                                                                       limit=limit)
    arc_result = found[1] if found[1] is not None else arc.timed_out()
    if not envelope.client_ip:
        spf_result = _no_client_ip(identity, domain, sender)
    elif found[2] is not None:
        spf_result = found[2]
    else:
        spf_result = spf.timed_out(envelope.client_ip, envelope.mail_from, envelope.helo)
    dmarc = await _deadline(
        evaluate_dmarc(resolver, message.parsed.from_address, spf_result, dkim_result,
                       discovery=settings.dmarc_discovery), deadline)
    if dmarc is None:
        dmarc = DmarcResult("temperror", reason="DMARC policy lookup timed out")

    value = header_value(authserv_id, spf_result, dkim_result, dmarc, arc_result,
                         envelope.iprev)
    result = AuthResult(
        spf=spf_result.result, dkim=dkim_result.summary, dmarc=dmarc.result,
        arc=arc_result.result,
        dmarc_policy=dmarc.policy,
        dmarc_disposition=dmarc.disposition if dmarc.result == "fail" else "",
        header_value=value,
        authserv_id=authserv_id, dkim_signatures=dkim_result.signatures, spf_detail=spf_result,
        dmarc_detail=dmarc, arc_detail=arc_result,
        iprev=envelope.iprev.result if envelope.iprev else "",
    )
    log.debug("auth.result", spf=result.spf, dkim=result.dkim, dmarc=result.dmarc,
             arc=result.arc, dmarc_policy=result.dmarc_policy,
             dmarc_disposition=result.dmarc_disposition)
    return result


def decide(result: AuthResult, settings: AuthSettings) -> AuthDecision:
    """Pure: verdicts + operator policy -> action. Order matters; each rule says why."""
    dmarc_fail = result.dmarc == "fail"
    # 1. The domain owner asked for rejection and the operator honours it (auth.dmarc_reject).
    if dmarc_fail and result.dmarc_disposition == "reject":
        if settings.dmarc_reject:
            return AuthDecision(AuthAction.REJECT, AuthReason.DMARC_REJECT)
        return AuthDecision(AuthAction.QUARANTINE, AuthReason.DMARC_REJECT)
    # 2. A check could not complete: retry later if configured, else accept (marked in A-R).
    temperror = "temperror" in (result.spf, result.dmarc) or result.dkim == "temperror"
    if temperror and settings.temperror == "tempfail":
        return AuthDecision(AuthAction.TEMPFAIL, AuthReason.DNS_TEMPERROR)
    # 3. SPF fail on its own, when the operator wants it rejected. A DMARC pass (an
    #    aligned DKIM signature) outranks it: forwarding breaks SPF (RFC 7489 10.1).
    if result.spf == "fail" and settings.spf_fail == "reject" and result.dmarc != "pass":
        return AuthDecision(AuthAction.REJECT, AuthReason.SPF_FAIL)
    # 3b. DMARC could not decide because an *aligned* identifier had a temperror, and the
    #     owner asked for quarantine or reject: never accept such mail unflagged (a forger
    #     who stalls our checks must not get past p=reject).
    if result.dmarc == "temperror" and result.dmarc_policy in ("quarantine", "reject"):
        return AuthDecision(AuthAction.QUARANTINE,
                            AuthReason.DMARC_TEMPERROR_REJECT if result.dmarc_policy == "reject"
                            else AuthReason.DMARC_TEMPERROR_QUARANTINE)
    # 4. The domain owner asked for quarantine.
    if dmarc_fail and result.dmarc_disposition == "quarantine":
        return AuthDecision(AuthAction.QUARANTINE, AuthReason.DMARC_QUARANTINE)
    if temperror:
        return AuthDecision(AuthAction.ACCEPT, AuthReason.DNS_TEMPERROR)
    if result.spf == "fail":
        return AuthDecision(AuthAction.ACCEPT, AuthReason.SPF_FAIL)
    return AuthDecision(AuthAction.ACCEPT)
