"""RCPT TO address -> mailbox, decided at RCPT time.

`<handle>[+tag]@<workspace>.<default domain>` (case-insensitive) reaches the
enabled agent `handle` of workspace `workspace`, and so does
`<handle>[+tag]@<custom domain>` once the workspace's custom domain is
verified (`smtpd-agent domain check`). Any other address under the default
domain is an unknown mailbox; any domain that is not ours, or a custom domain
not verified yet, is refused as relaying, whatever the mailbox (the log says
why). `<verp prefix>-<token>@bounce.<default domain>` (and
`@<mail_from_label>.<verified custom domain>`) are VERP bounce addresses of our
outbound mail: they route to the bounce processor (outbound/bounces.py).
`postmaster` (RFC 5321 section 4.5.1: case-insensitive, with or without a
domain, at every domain we receive for) reaches the workspace's own agent
named postmaster when there is one, else the mailbox `routing.postmaster`
names (the operator's); without it, postmaster is an unknown mailbox.
Lookups, of mailboxes and of custom domains, are cached, positive and
negative, for a short TTL so RCPT does not cost a Postgres round trip every
time; the cache is only a cache: it is safe to lose, and another host has its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import asyncpg
import structlog

from .addresses import POSTMASTER, Address, OurDomains, parse_address, token_of
from .config import Settings
from .record import Mailbox
from .store import directory
from .store import domains as domain_store
from .store.database import CONNECTION_ERRORS, DatabaseUnavailable

log = structlog.get_logger(__name__)

MAX_CACHE_ENTRIES = 100_000


class RouteKind(Enum):
    MAILBOX = "mailbox"
    UNKNOWN_MAILBOX = "unknown_mailbox"
    RELAY_DENIED = "relay_denied"
    # a VERP Return-Path of our outbound mail: DSNs go to the bounce processor
    BOUNCE = "bounce"


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    mailbox: Mailbox | None = None
    tag: str | None = None
    # why a RELAY_DENIED was denied, for the log (never for the client)
    reason: str = "relay denied"
    hint: str | None = None
    verp_token: str | None = None


class Router:
    def __init__(self, db: asyncpg.Pool, default_domain: str, cache_ttl: float,
                 clock: Callable[[], float] = time.monotonic, *, bounce_label: str = "bounce",
                 custom_bounce_label: str = "mail", verp_prefix: str = "b",
                 postmaster: str = "") -> None:
        self._db = db
        self._postmaster = parse_address(postmaster) if postmaster else None
        self._bounce_domain = f"{bounce_label}.{default_domain}"
        self._custom_bounce_label = custom_bounce_label
        self._verp_prefix = verp_prefix
        self._ours = OurDomains(default_domain)
        self._ttl = cache_ttl
        self._clock = clock
        self._cache: dict[tuple[str, str, str], tuple[float, Mailbox | None]] = {}
        self._domains: dict[str, tuple[float, domain_store.Domain | None]] = {}

    @classmethod
    def from_settings(cls, db: asyncpg.Pool, settings: Settings) -> Router:
        """The runtime's one router: SMTP and every provider webhook route through it."""
        return cls(db, settings.server.default_domain, settings.routing.cache_ttl,
                   bounce_label=settings.domains.default_mail_from_label,
                   custom_bounce_label=settings.domains.mail_from_label,
                   verp_prefix=settings.outbound.verp_prefix,
                   postmaster=settings.routing.postmaster)

    async def route(self, address: str) -> Route:
        parsed = parse_address(address)
        if parsed is None:
            if address.strip().strip("<>").lower() == POSTMASTER:  # RCPT TO:<Postmaster>
                return await self._postmaster_route(None)
            return Route(RouteKind.UNKNOWN_MAILBOX)
        route = await self._route(parsed)
        if route.kind is RouteKind.UNKNOWN_MAILBOX and parsed.local == POSTMASTER:
            return await self._postmaster_route(parsed.tag)
        return route

    async def _postmaster_route(self, tag: str | None) -> Route:
        """The operator's mailbox for postmaster, where no workspace has its own."""
        if self._postmaster is None:
            return Route(RouteKind.UNKNOWN_MAILBOX)
        route = await self._route(self._postmaster)
        if route.kind is not RouteKind.MAILBOX:
            log.warning("routing.postmaster_unroutable",
                        postmaster=f"{self._postmaster.local}@{self._postmaster.domain}",
                        found=route.kind.value)
            return Route(RouteKind.UNKNOWN_MAILBOX)
        return Route(RouteKind.MAILBOX, mailbox=route.mailbox, tag=tag)

    async def _route(self, parsed: Address) -> Route:
        bounce = await self._bounce_route(parsed)
        if bounce is not None:
            return bounce
        slug = self._ours.workspace(parsed.domain)
        if slug is None and not self._ours.is_ours(parsed.domain):
            custom = await self._custom_domain(parsed.domain)
            if custom is None:
                return Route(RouteKind.RELAY_DENIED)
            if not custom.receives:
                return Route(RouteKind.RELAY_DENIED, reason=f"domain {custom.state}",
                             hint=f"{custom.name} (workspace {custom.workspace_slug}) is "
                                  f"{custom.state}: publish its records and run "
                                  f"`smtpd-agent domain check {custom.name}`")
            slug = custom.workspace_slug
        if slug is None:
            return Route(RouteKind.UNKNOWN_MAILBOX)
        mailbox = await self._lookup(slug, parsed.local, parsed.domain)
        if mailbox is None:
            return Route(RouteKind.UNKNOWN_MAILBOX)
        return Route(RouteKind.MAILBOX, mailbox=mailbox, tag=parsed.tag)

    async def _bounce_route(self, parsed: Address) -> Route | None:
        """BOUNCE for a VERP address at one of our bounce domains, UNKNOWN for others there."""
        label, _, parent = parsed.domain.partition(".")
        if parsed.domain == self._bounce_domain:
            pass
        elif label == self._custom_bounce_label and parent:
            custom = await self._custom_domain(parent)
            if custom is None or not custom.receives or custom.mail_from != parsed.domain:
                return None
        else:
            return None
        token = token_of(parsed.local, self._verp_prefix) if parsed.tag is None else None
        if token is None:
            return Route(RouteKind.UNKNOWN_MAILBOX)
        return Route(RouteKind.BOUNCE, verp_token=token)

    async def _lookup(self, slug: str, handle: str, domain: str) -> Mailbox | None:
        key = (slug, handle, domain)
        now = self._clock()
        cached = self._cache.get(key)
        if cached and cached[0] > now:
            return cached[1]
        try:
            agent = await directory.find_mailbox(self._db, slug, handle)
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(str(error)) from error
        mailbox = None
        if agent is not None:
            mailbox = Mailbox(workspace_id=agent.workspace_id, workspace_slug=agent.workspace_slug,
                              agent_id=agent.id, handle=agent.handle, domain=domain,
                              auto_reply=agent.auto_reply)
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key] = (now + self._ttl, mailbox)
        return mailbox

    async def _custom_domain(self, name: str) -> domain_store.Domain | None:
        """A registered custom domain (any state), cached like mailboxes."""
        now = self._clock()
        cached = self._domains.get(name)
        if cached and cached[0] > now:
            return cached[1]
        try:
            found = await domain_store.find_domain(self._db, name)
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(str(error)) from error
        if len(self._domains) >= MAX_CACHE_ENTRIES:
            self._domains.clear()
        self._domains[name] = (now + self._ttl, found)
        return found
