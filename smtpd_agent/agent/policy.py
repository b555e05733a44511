"""Pure decisions of the reply worker: may we answer, and when to retry.

Stage 6 of the pipeline, before any API call. RFC 3834 section 2 says an
automatic responder must not answer auto-submitted mail, mailing lists, bounces
or itself; beyond that we refuse mail we could not authenticate or scan, since a
reply to forged mail is backscatter. Each function is table-tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses

from ..addresses import domain_of, within

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
    if facts.dmarc == "fail":
        return "DMARC fail"
    if facts.scan_status not in SCANNED_OK:
        return f"scan status {facts.scan_status}"
    return None


def rate_limit_reason(to_correspondent: int, from_agent: int, per_correspondent: int,
                      per_agent: int) -> str | None:
    """Counts are replies in the last hour; a limit of 0 means none allowed."""
    if to_correspondent >= per_correspondent:
        return f"rate limit: {per_correspondent} replies per hour to this correspondent"
    if from_agent >= per_agent:
        return f"rate limit: {per_agent} replies per hour from this agent"
    return None


def retry_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff after the `attempt`-th failed try; a longer Retry-After wins."""
    delay = min(cap, base * 2 ** max(attempt - 1, 0))
    if retry_after is not None and retry_after > delay:
        delay = min(retry_after, cap)
    return delay


def reply_address(from_address: str | None, reply_to: str | None, mail_from: str | None,
                  dmarc: str | None) -> str | None:
    """Whom the reply goes to: Reply-To only when DMARC passed (else it is forgeable).

    Exactly one address, never several: an agent answers its correspondent, no one else.
    """
    if reply_to and dmarc == "pass":
        candidate = _single_address(reply_to)
        if candidate:
            return candidate
    for value in (from_address, mail_from):
        candidate = _single_address(value or "")
        if candidate:
            return candidate
    return None


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
