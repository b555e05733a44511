"""SPF (RFC 7208) for the authenticate stage: is the client IP allowed to send for this domain?

Checks the MAIL FROM identity, or the HELO identity for the null sender
(RFC 7208 section 2.4), against the connecting IP with pyspf. pyspf is
synchronous: with the sender's records cached it runs on the event loop
(tens of microseconds), otherwise in a worker thread; either way its DNS
lookups go to *our* resolver (shared cache, configured nameservers, one
timeout), with every DNS temporary error surfacing as `temperror`
(RFC 7208 section 2.6.6), never as fail or none.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from dataclasses import dataclass
from typing import Any, Literal

import spf
import structlog

from ..dns import DnsTempError, Resolver, SyncResolver

log = structlog.get_logger(__name__)

SpfStatus = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
SPF_STATUSES: frozenset[str] = frozenset(
    ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"))

# RFC 7208 section 4.6.4 bounds the work per check with lookup limits; this
# bounds the wall clock (section 4.6.4 suggests at least 20 s for the whole check).
DEFAULT_SPF_TIMEOUT = 20.0

# pyspf calls the module-level function `spf.DNSLookup` for every query. We
# install one dispatcher, once, that uses the resolver bound in the *current
# context* (set inside the worker thread, so concurrent checks with different
# resolvers never see each other's) and falls back to pyspf's own lookup for
# any other code in the process that calls pyspf directly.
_CURRENT: contextvars.ContextVar[SyncResolver] = contextvars.ContextVar("spf_resolver")
_PYSPF_LOOKUP = spf.DNSLookup


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


def _dns_lookup(name: str, qtype: str, strict: bool = True,
                timeout: float | None = None) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNS interface, answered by our resolver (same shapes as pyspf's dnspython one)."""
    view = _CURRENT.get(None)
    if view is None:
        return list(_PYSPF_LOOKUP(name, qtype, strict, timeout))
    try:
        answer = view.query(name, qtype)
    except DnsTempError as error:
        raise spf.TempError(f"DNS {error}") from error
    results: list[tuple[tuple[str, str], Any]] = []
    for rdata in answer.records:
        if qtype in ("A", "AAAA"):
            value: Any = rdata.address
        elif qtype == "MX":
            value = (rdata.preference, rdata.exchange.to_text(omit_final_dot=True))
        elif qtype == "PTR":
            value = rdata.target.to_text(omit_final_dot=True)
        elif qtype in ("TXT", "SPF"):
            value = tuple(rdata.strings)
        else:  # pragma: no cover - pyspf asks for nothing else
            continue
        results.append(((name, qtype), value))
    return results


def _install() -> None:
    if spf.DNSLookup is not _dns_lookup:
        spf.DNSLookup = _dns_lookup


def spf_identity(mail_from: str, helo: str) -> tuple[Literal["mailfrom", "helo"], str, str]:
    """(identity, sender, domain) to check: MAIL FROM, or postmaster@HELO for `<>` (RFC 7208 2.4)."""
    sender = mail_from.strip().strip("<>")
    if sender:
        domain = sender.rpartition("@")[2] if "@" in sender else sender
        return "mailfrom", sender, domain.lower()
    return "helo", f"postmaster@{helo}", helo.lower()


def _evaluate(view: SyncResolver, client_ip: str, sender: str, helo: str, timeout: float,
              default_explanation: str | None) -> tuple[str, str]:
    """pyspf's (result, explanation), its lookups answered by `view`."""
    token = _CURRENT.set(view)
    try:
        query = spf.query(i=client_ip, s=sender, h=helo, querytime=timeout)
        if default_explanation is not None:
            query.set_default_explanation(default_explanation)
        result, _code, explanation = query.check()
        return result, explanation
    finally:
        _CURRENT.reset(token)


def check_spf_cached(resolver: Resolver, client_ip: str, mail_from: str, helo: str, *,
                     timeout: float = DEFAULT_SPF_TIMEOUT,
                     default_explanation: str | None = None) -> SpfResult | None:
    """The verdict right now from cached DNS answers, or None when a lookup is needed."""
    _install()
    outcome = resolver.from_cache(functools.partial(
        _evaluate, client_ip=client_ip, sender=mail_from.strip().strip("<>"), helo=helo,
        timeout=timeout, default_explanation=default_explanation))
    return None if outcome is None else _result(outcome, client_ip, mail_from, helo)


async def check_spf_in_thread(resolver: Resolver, client_ip: str, mail_from: str, helo: str, *,
                              timeout: float = DEFAULT_SPF_TIMEOUT,
                              default_explanation: str | None = None) -> SpfResult:
    """The full way: pyspf in a worker thread, its lookups on the event loop."""
    _install()
    try:
        async with asyncio.timeout(timeout):
            outcome = await resolver.in_thread(functools.partial(
                _evaluate, client_ip=client_ip, sender=mail_from.strip().strip("<>"),
                helo=helo, timeout=timeout, default_explanation=default_explanation))
    except TimeoutError:
        outcome = "temperror", "SPF evaluation timed out"
    return _result(outcome, client_ip, mail_from, helo)


async def check_spf(resolver: Resolver, client_ip: str, mail_from: str, helo: str, *,
                    timeout: float = DEFAULT_SPF_TIMEOUT,
                    default_explanation: str | None = None) -> SpfResult:
    """Evaluate SPF for the envelope; never raises for DNS trouble (that is temperror)."""
    cached = check_spf_cached(resolver, client_ip, mail_from, helo, timeout=timeout,
                              default_explanation=default_explanation)
    return cached if cached is not None else await check_spf_in_thread(
        resolver, client_ip, mail_from, helo, timeout=timeout,
        default_explanation=default_explanation)


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
