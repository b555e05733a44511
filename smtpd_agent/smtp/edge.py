"""Reputation at the edge (issue 17): what the listener decides about a client, not a message.

At connect, before the greeting: a banned client, or one over its connection
rate, gets 421 4.7.0; then every DNSBL zone (edge.dnsbl) is asked at once
through our resolver and its cache, and a listed client gets 554 5.7.1 naming
the lists (edge.dnsbl_action = "reject") or is only logged and marked on its
messages ("mark"). DNS trouble (timeout, SERVFAIL, a refused query) never
refuses. iprev starts at connect too, without holding the greeting back, and
is awaited once, by the first message. During the session, each MAIL counts
toward the message rate and each RCPT that is not accepted toward the failed
RCPT rate (dictionary attacks); over either, 421 4.7.0 and a ban. Rates and bans
are per IPv4 address or IPv6 /64, shared by every accepting process
(limits.ClientRates). Each decision is a typed value; `reply_for` is the one
table from decision to reply.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

import structlog

from ..auth import dnsbl
from ..auth.iprev import check_iprev
from ..config import EdgeSettings
from ..dns import Resolver
from ..metrics import Metrics
from ..record import Iprev
from . import replies
from .limits import ClientRates, RateKind, RateVerdict
from .replies import Reply

log = structlog.get_logger("smtpd_agent.smtp")


class EdgeAction(enum.Enum):
    ACCEPT = "accept"
    BANNED = "banned"  # a ban from earlier still holds
    RATE_EXCEEDED = "rate exceeded"  # this connection or command went over a rate: banned now
    LISTED = "dnsbl listed"  # in a DNSBL zone, with edge.dnsbl_action = "reject"


@dataclass(frozen=True)
class EdgeDecision:
    action: EdgeAction
    ip: str = ""
    listed: tuple[str, ...] = ()  # zones that list the client (refused, or only marked)
    kind: RateKind | None = None  # the rate that was exceeded


def reply_for(decision: EdgeDecision) -> Reply | None:
    """The one table: decision -> reply (None: carry on)."""
    if decision.action is EdgeAction.BANNED:
        return replies.CLIENT_BANNED
    if decision.action is EdgeAction.RATE_EXCEEDED:
        return replies.RATE_EXCEEDED
    if decision.action is EdgeAction.LISTED:
        return replies.client_listed(decision.ip, decision.listed)
    return None


class Edge:
    """The client checks of one listener; one instance serves every session."""

    def __init__(self, settings: EdgeSettings, resolver: Resolver, rates: ClientRates,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.resolver = resolver
        self.rates = rates
        self.metrics = metrics

    def _verdict(self, ip: str, kind: RateKind, verdict: RateVerdict) -> EdgeDecision:
        if verdict is RateVerdict.WITHIN:
            return EdgeDecision(EdgeAction.ACCEPT, ip)
        if verdict is RateVerdict.EXCEEDED:
            limit = self.rates.limits[kind]
            log.warning("edge.rate_exceeded", kind=kind.name.lower(), limit=limit,
                        window=self.rates.window, ban_seconds=self.rates.ban_seconds)
            if self.metrics is not None:
                self.metrics.edge_rate_exceeded.labels(kind.name.lower()).inc()
            decision = EdgeDecision(EdgeAction.RATE_EXCEEDED, ip, kind=kind)
        else:
            log.info("edge.banned", kind=kind.name.lower(),
                     seconds_left=round(self.rates.ban_left(ip), 1))
            decision = EdgeDecision(EdgeAction.BANNED, ip, kind=kind)
        if self.metrics is not None:
            self.metrics.edge_refused.labels(decision.action.value).inc()
        return decision

    def connection(self, ip: str) -> EdgeDecision:
        """Before anything else on a new connection: a ban, then the connection rate."""
        return self._verdict(ip, RateKind.CONNECTION, self.rates.note(ip, RateKind.CONNECTION))

    def message(self, ip: str) -> EdgeDecision:
        return self._verdict(ip, RateKind.MESSAGE, self.rates.note(ip, RateKind.MESSAGE))

    def failed_rcpt(self, ip: str) -> EdgeDecision:
        return self._verdict(ip, RateKind.FAILED_RCPT, self.rates.note(ip, RateKind.FAILED_RCPT))

    async def screen(self, ip: str) -> EdgeDecision:
        """The DNSBL zones, all at once, each within edge.dnsbl_timeout."""
        zones = self.settings.dnsbl
        if not zones or not ip:
            return EdgeDecision(EdgeAction.ACCEPT, ip)
        results = await dnsbl.check(self.resolver, ip, zones, self.settings.dnsbl_timeout)
        listed = tuple(r.zone for r in results if r.listing is dnsbl.Listing.LISTED)
        for result in results:
            if self.metrics is not None:
                self.metrics.dnsbl.labels(result.zone, result.listing.value).inc()
            if result.listing is dnsbl.Listing.ERROR:
                log.info("edge.dnsbl_error", zone=result.zone, reason=result.reason)
        if not listed:
            return EdgeDecision(EdgeAction.ACCEPT, ip)
        codes = {r.zone: list(r.codes) for r in results if r.codes}
        if self.settings.dnsbl_action == "reject":
            log.info("edge.dnsbl_listed", zones=list(listed), codes=codes, action="reject")
            if self.metrics is not None:
                self.metrics.edge_refused.labels(EdgeAction.LISTED.value).inc()
            return EdgeDecision(EdgeAction.LISTED, ip, listed)
        log.info("edge.dnsbl_listed", zones=list(listed), codes=codes, action="mark")
        return EdgeDecision(EdgeAction.ACCEPT, ip, listed)

    def start_iprev(self, ip: str) -> asyncio.Task[Iprev] | None:
        """iprev of the client, running while the session goes on (edge.iprev)."""
        if not self.settings.iprev or not ip:
            return None
        return asyncio.get_running_loop().create_task(self._iprev(ip))

    async def _iprev(self, ip: str) -> Iprev:
        try:
            result = await check_iprev(self.resolver, ip, self.settings.iprev_timeout)
        except Exception:  # a signal only: a bug here must not turn mail away with 451
            log.exception("edge.iprev_failed")
            result = Iprev("temperror", ip)
        if self.metrics is not None:
            self.metrics.iprev.labels(result.result).inc()
        log.debug("edge.iprev", result=result.result, name=result.name)
        return result
