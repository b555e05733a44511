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
Lookups that find a mailbox or a receiving custom domain are cached for
`routing.cache_ttl` so RCPT does not cost a Postgres round trip every time; a
change to agents, workspaces or domains is pushed by Postgres (LISTEN/NOTIFY,
store/changes.py, store/functions/notify_routing_change.sql) and drops the cache
at once. A miss is never cached: a refusal (5xx) always comes from a fresh read,
so a domain verified a moment ago is not bounced. The cache is only a cache: safe
to lose, and another host has its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import asyncpg
import structlog

from .addresses import POSTMASTER, Address, OurDomains, parse_address, token_of
from .config import Settings
from .record import Mailbox
from .store import directory
from .store import domains as domain_store
from .store.changes import ROUTING_CHANNEL, ChangeFeed
from .store.database import CONNECTION_ERRORS, DatabaseUnavailable

log = structlog.get_logger(__name__)

MAX_CACHE_ENTRIES = 100_000


class RouteKind(Enum):
    MAILBOX = "mailbox"
    UNKNOWN_MAILBOX = "unknown_mailbox"
    RELAY_DENIED = "relay_denied"
    # a VERP Return-Path of our outbound mail: DSNs go to the bounce processor
    BOUNCE = "bounce"


REFUSALS = (RouteKind.UNKNOWN_MAILBOX, RouteKind.RELAY_DENIED)


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
                 postmaster: str = "", changes: ChangeFeed | None = None) -> None:
        self._db = db
        self._postmaster = parse_address(postmaster) if postmaster else None
        self._bounce_domain = f"{bounce_label}.{default_domain}"
        self._custom_bounce_label = custom_bounce_label
        self._verp_prefix = verp_prefix
        self._ours = OurDomains(default_domain)
        self._ttl = cache_ttl
        self._clock = clock
        # only answers that accept: (expires, value)
        self._cache: dict[tuple[str, str, str], tuple[float, Mailbox]] = {}
        self._domains: dict[str, tuple[float, domain_store.Domain]] = {}
        # bumped by every invalidation: a read that overlapped one is not cached
        self._generation = 0
        if changes is not None:
            changes.subscribe(ROUTING_CHANNEL, self._changed, self.invalidate)

    @classmethod
    def from_settings(cls, db: asyncpg.Pool, settings: Settings,
                      changes: ChangeFeed | None = None) -> Router:
        """The runtime's one router: SMTP and every provider webhook route through it."""
        return cls(db, settings.server.default_domain, settings.routing.cache_ttl,
                   bounce_label=settings.domains.default_mail_from_label,
                   custom_bounce_label=settings.domains.mail_from_label,
                   verp_prefix=settings.outbound.verp_prefix,
                   postmaster=settings.routing.postmaster, changes=changes)

    async def route(self, address: str) -> Route:
        route = await self._route_address(address)
        if route.kind in REFUSALS and self._forget_domains(address):
            # a refusal never rests on a cached domain (a move the push missed): ask again
            route = await self._route_address(address)
        return route

    def _forget_domains(self, address: str) -> bool:
        parsed = parse_address(address)
        if parsed is None:
            return False
        names = (parsed.domain, parsed.domain.partition(".")[2])
        return bool([n for n in names if self._domains.pop(n, None) is not None])

    async def _route_address(self, address: str) -> Route:
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
        cached = self._cache.get(key)
        if cached and cached[0] > self._clock():
            return cached[1]
        generation = self._generation
        try:
            agent = await directory.find_mailbox(self._db, slug, handle)
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(str(error)) from error
        if agent is None:
            return None
        mailbox = Mailbox(workspace_id=agent.workspace_id, workspace_slug=agent.workspace_slug,
                          agent_id=agent.id, handle=agent.handle, domain=domain,
                          auto_reply=agent.auto_reply)
        self._remember(self._cache, key, mailbox, generation)
        return mailbox

    async def _custom_domain(self, name: str) -> domain_store.Domain | None:
        """A registered custom domain (any state); cached only while it receives mail."""
        cached = self._domains.get(name)
        if cached and cached[0] > self._clock():
            return cached[1]
        generation = self._generation
        try:
            found = await domain_store.find_domain(self._db, name)
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(str(error)) from error
        if found is not None and found.receives:
            self._remember(self._domains, name, found, generation)
        return found

    def _remember(self, cache: dict[Any, tuple[float, Any]], key: Any, value: Any,
                  generation: int) -> None:
        if generation != self._generation:
            return  # a change was announced while we read: the row may predate it
        if len(cache) >= MAX_CACHE_ENTRIES:
            cache.clear()
        cache[key] = (self._clock() + self._ttl, value)

    def _changed(self, payload: str) -> None:
        log.debug("routing.cache_dropped", changed=payload)
        self.invalidate()

    def invalidate(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._domains.clear()
