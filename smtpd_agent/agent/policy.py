"""Pure decisions of the reply worker: may we answer, whom, and when to retry.

Stage 6 of the pipeline, before any API call. RFC 3834 section 2 says an
automatic responder must not answer auto-submitted mail, mailing lists, bounces
or itself; beyond that we answer only a correspondent whose From we could
authenticate (a reply to forged mail is backscatter, and DKIM-signed by us it
is worse), only mail that was scanned, only within the caps (agent/caps.py), and a Reply-To
only inside the From's organizational domain. Each function is table-tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any

from ..addresses import OurDomains, domain_of, within
from ..auth.dmarc import organizational_domain

# Local parts that are machines, not people (RFC 3834 section 2, RFC 2142, common practice).
AUTOMATED_LOCAL = re.compile(
    r"^(mailer-daemon|postmaster|no-?reply|do-?not-?reply|nobody|bounces?|listserv|majordomo"
    r"|owner-.+|.+-(request|bounces?|owner)|noreply[-+.].*|no-reply[-+.].*)$",
    re.IGNORECASE)
# Headers whose mere presence marks a list or an autoresponder.
LIST_HEADERS = ("List-Id", "List-Unsubscribe")
# Scan statuses that allow a reply; infected, unscanned (outage) and error do not.
SCANNED_OK = frozenset({"clean", "skipped", None})


@dataclass(frozen=True)
class MessageFacts:
    """What the decision needs from a stored inbound message."""

    headers: tuple[tuple[str, str], ...]
    mail_from: str | None
    from_address: str | None
    dmarc: str | None
    quarantined: bool
    scan_status: str | None
    # SPF's verdict and the domain it is for; the domains of passing DKIM signatures
    spf: str | None = None
    spf_domain: str = ""
    dkim_pass_domains: tuple[str, ...] = ()

    @classmethod
    def with_auth_detail(cls, detail: dict[str, Any] | None, **fields: Any) -> MessageFacts:
        """Facts with the SPF and DKIM identities of the stored `auth_detail` (AuthResult)."""
        detail = detail if isinstance(detail, dict) else {}
        spf = detail.get("spf_detail") if isinstance(detail.get("spf_detail"), dict) else {}
        signatures = detail.get("dkim_signatures")
        passing = tuple(str(s.get("domain") or "") for s in
                        (signatures if isinstance(signatures, list) else [])
                        if isinstance(s, dict) and s.get("result") == "pass" and s.get("domain"))
        return cls(spf=str(spf.get("result") or "") or None, spf_domain=str(spf.get("domain") or ""),
                   dkim_pass_domains=passing, **fields)

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((value for key, value in self.headers if key.lower() == lowered), None)


def is_own_address(address: str, own_domain: str,
                   custom_domains: frozenset[str] = frozenset()) -> bool:
    """An address on our domain, a workspace's custom domain, or a subdomain of either."""
    domain = domain_of(address)
    return any(within(domain, ours) for ours in (own_domain, *custom_domains))


def parent_domains(domain: str) -> list[str]:
    """The domain and each parent with at least two labels: where to look for a custom domain."""
    labels = domain.lower().strip(".").split(".")
    return [".".join(labels[i:]) for i in range(max(len(labels) - 1, 1))]


def loop_skip_reason(facts: MessageFacts, own_domain: str,
                     custom_domains: frozenset[str] = frozenset()) -> str | None:
    """Why we must not answer this message, or None. First matching rule wins."""
    mail_from = (facts.mail_from or "").strip()
    if mail_from in ("", "<>"):
        return "null sender (bounce or DSN)"
    auto = (facts.header("Auto-Submitted") or "no").split(";")[0].strip().lower()
    if auto != "no":
        return f"Auto-Submitted: {auto}"
    precedence = (facts.header("Precedence") or "").strip().lower()
    if precedence in ("bulk", "list", "junk"):
        return f"Precedence: {precedence}"
    for name in LIST_HEADERS:
        if facts.header(name) is not None:
            return f"mailing list ({name})"
    suppress = (facts.header("X-Auto-Response-Suppress") or "").lower()
    if any(token.strip() in ("all", "autoreply", "oof") for token in suppress.split(",")):
        return f"X-Auto-Response-Suppress: {suppress.strip()}"
    for address in (mail_from, facts.from_address or ""):
        if not address:
            continue
        if is_own_address(address, own_domain, custom_domains):
            return f"from our own agents ({address})"
        local = address.rpartition("@")[0]
        if AUTOMATED_LOCAL.match(local):
            return f"automated sender ({address})"
    if facts.quarantined:
        return "quarantined"
    if facts.scan_status not in SCANNED_OK:
        return f"scan status {facts.scan_status}"
    return unauthenticated_reason(facts)


def same_organization(a: str, b: str) -> bool:
    """RFC 7489 relaxed alignment: the same organizational domain (Public Suffix List)."""
    a, b = a.lower().strip().rstrip("."), b.lower().strip().rstrip(".")
    return bool(a and b) and organizational_domain(a) == organizational_domain(b)


def unauthenticated_reason(facts: MessageFacts) -> str | None:
    """Why the From address is not authenticated, or None: then we may answer it.

    DMARC pass is enough. Where the From domain publishes no DMARC record (DMARC
    none), an SPF or DKIM pass for a domain aligned with it (relaxed, as DMARC
    would) stands in. Anything else (fail, temperror, permerror, no verdict) is
    forgeable: no reply.
    """
    from_domain = domain_of(facts.from_address) if facts.from_address else ""
    if facts.dmarc == "pass":
        return None
    if facts.dmarc != "none":
        return f"sender not authenticated: DMARC {facts.dmarc or 'not evaluated'}"
    if not from_domain:
        return "sender not authenticated: no From address"
    if facts.spf == "pass" and same_organization(facts.spf_domain, from_domain):
        return None
    if any(same_organization(domain, from_domain) for domain in facts.dkim_pass_domains):
        return None
    return (f"sender not authenticated: {from_domain} has no DMARC record and neither SPF "
            "nor DKIM passed for it")


def retry_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff after the `attempt`-th failed try; a longer Retry-After wins."""
    delay = min(cap, base * 2 ** max(attempt - 1, 0))
    if retry_after is not None and retry_after > delay:
        delay = min(retry_after, cap)
    return delay


def reply_address(from_address: str | None, reply_to: str | None) -> str | None:
    """Whom the reply goes to: the From address, or a Reply-To in the same organization.

    The caller has authenticated the From domain (unauthenticated_reason); a
    Reply-To elsewhere could be anyone's address (the victim of a relay attack),
    so it is ignored and the From answered. Exactly one address, never several.
    """
    sender = _single_address(from_address or "")
    if sender is None:
        return None
    if reply_to:
        candidate = _single_address(reply_to)
        if candidate and same_organization(domain_of(candidate), domain_of(sender)):
            return candidate
    return sender


def _single_address(value: str) -> str | None:
    """The one address in a header value; None for several, none, or anything odd."""
    if "\r" in value or "\n" in value:
        return None
    found = [address for _, address in getaddresses([value]) if address]
    if len(found) != 1:
        return None
    address = found[0].strip()
    if (not address or address.count("@") != 1 or any(ch in address for ch in "\r\n\t ,;<>")
            or not address.partition("@")[0] or "." not in address.partition("@")[2]):
        return None
    return address


def agent_address(handle: str, slug: str, rcpt_domain: str | None, ours: OurDomains,
                  custom_domain_ok: bool = False) -> str:
    """The agent's address on the domain the correspondent wrote to, if that domain is its own
    (its workspace's subdomain, or a custom domain of its workspace that receives: the
    caller looks that up); else the default one. Replies of the built-in agent and over
    the API alike."""
    if rcpt_domain and (custom_domain_ok or ours.workspace(rcpt_domain) == slug):
        return f"{handle}@{rcpt_domain}"
    return ours.agent_address(handle, slug)
