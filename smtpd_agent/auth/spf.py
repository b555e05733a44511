"""SPF (RFC 7208) for the authenticate stage: is the client IP allowed to send for this domain?

Checks the MAIL FROM identity, or the HELO identity for the null sender
(RFC 7208 section 2.4), against the connecting IP with pyspf. pyspf is
synchronous: `spf_check()` hands it to auth/runner.py, which runs it on the
event loop when the sender's records are cached (tens of microseconds), else in
the "dns" thread pool; either way its DNS lookups go to *our* resolver, per
query (auth/adapters.SpfQuery: shared cache, configured nameservers, one
timeout), with every DNS temporary error surfacing as `temperror`
(RFC 7208 section 2.6.6), never as fail or none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from ..dns import SyncResolver
from .adapters import SpfQuery
from .runner import SyncCheck

log = structlog.get_logger(__name__)

SpfStatus = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
SPF_STATUSES: frozenset[str] = frozenset(
    ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"))

# RFC 7208 section 4.6.4 bounds the work per check with lookup limits; this
# bounds the wall clock (section 4.6.4 suggests at least 20 s for the whole check).
DEFAULT_SPF_TIMEOUT = 20.0


@dataclass(frozen=True)
class SpfResult:
    """One SPF verdict with the identity it was computed for (for Authentication-Results)."""

    result: SpfStatus
    identity: Literal["mailfrom", "helo"]
    domain: str
    sender: str
    client_ip: str
    reason: str = ""
    explanation: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def spf_identity(mail_from: str, helo: str) -> tuple[Literal["mailfrom", "helo"], str, str]:
    """(identity, sender, domain) to check: MAIL FROM, or postmaster@HELO for `<>` (RFC 7208 2.4)."""
    sender = mail_from.strip().strip("<>")
    if sender:
        domain = sender.rpartition("@")[2] if "@" in sender else sender
        return "mailfrom", sender, domain.lower()
    return "helo", f"postmaster@{helo}", helo.lower()


def _evaluate(view: SyncResolver, client_ip: str, mail_from: str, helo: str, timeout: float,
              default_explanation: str | None) -> SpfResult:
    """pyspf's verdict, its lookups answered by `view`."""
    query = SpfQuery(view, i=client_ip, s=mail_from.strip().strip("<>"), h=helo,
                     querytime=timeout)
    if default_explanation is not None:
        query.set_default_explanation(default_explanation)
    result, _code, explanation = query.check()
    return _result((result, explanation), client_ip, mail_from, helo)


def spf_check(client_ip: str, mail_from: str, helo: str, *,
              timeout: float = DEFAULT_SPF_TIMEOUT,
              default_explanation: str | None = None) -> SyncCheck[SpfResult]:
    """SPF as a check for auth/runner.py (pyspf mostly waits for DNS: the "dns" pool)."""
    return SyncCheck(functools.partial(
        _evaluate, client_ip=client_ip, mail_from=mail_from, helo=helo, timeout=timeout,
        default_explanation=default_explanation), pool="dns")


def timed_out(client_ip: str, mail_from: str, helo: str) -> SpfResult:
    return _result(("temperror", "SPF evaluation timed out"), client_ip, mail_from, helo)


def _result(outcome: tuple[str, str], client_ip: str, mail_from: str, helo: str) -> SpfResult:
    result, explanation = outcome
    identity, sender, domain = spf_identity(mail_from, helo)
    # pyspf's legacy names (RFC 4408 drafts) map onto RFC 7208 results.
    result = {"error": "temperror", "unknown": "permerror", "ambiguous": "permerror"}.get(
        result, result)
    if result not in SPF_STATUSES:  # pragma: no cover - defensive
        result = "permerror"
    reason = explanation if result in ("temperror", "permerror") else ""
    log.debug("spf.checked", result=result, identity=identity, domain=domain, ip=client_ip)
    return SpfResult(result=result,  # type: ignore[arg-type]
                     identity=identity, domain=domain, sender=sender, client_ip=client_ip,
                     reason=reason, explanation=explanation if result == "fail" else "")
