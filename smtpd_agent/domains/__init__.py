"""Domains: the operator's default domain and the custom domains workspaces bring.

Sits beside the pipeline rather than in it: `dns-records` and `domain add`
say what DNS must publish (records.py), `domain check` and the periodic
re-check verify it (check.py, service.py), and routing asks the store which
custom domains are verified. The DKIM key store (keys.py) is shared with
outbound signing and the delegated-zone DNS server.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
import structlog

from ..addresses import OurDomains
from ..config import Settings
from ..dns import Resolver
from ..store import domains as store
from ..store.directory import DirectoryError
from .check import CheckReport, DomainChecker
from .keys import DkimKey, KeyStore, SigningKey, operator_workspace_id
from .records import (
    DnsRecord,
    RecordSet,
    custom_domain_records,
    default_domain_records,
    delegated_domain_records,
    mail_from_domain,
)

log = structlog.get_logger(__name__)

# pg_advisory_xact_lock key: one process at a time creates the default domain's first keys
DEFAULT_KEYS_LOCK = 0x646B696D64656661


def key_file(settings: Settings) -> Path:
    return Path(settings.domains.key_file or settings.server.state_dir / "dkim.secret")


def open_key_store(db: asyncpg.Pool | asyncpg.Connection, settings: Settings) -> KeyStore:
    """The key store with the service's secret (created when the first key is made)."""
    return KeyStore(db, key_file(settings), settings.domains.dkim_selector_prefix)


@dataclass(frozen=True)
class RotationStep:
    """What one rotation step did: selectors made, now signing, still unserved, retired."""

    domain: str
    created: list[str] = field(default_factory=list)
    activated: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)


@dataclass
class Domains:
    """Add, describe, check and remove domains; one per command or service, no global state."""

    db: asyncpg.Pool
    settings: Settings
    keys: KeyStore
    resolver: Resolver

    @classmethod
    def open(cls, db: asyncpg.Pool, settings: Settings,
             resolver: Resolver | None = None) -> Domains:
        return cls(db, settings, open_key_store(db, settings), resolver or Resolver(settings.dns))

    def _own_domain(self, name: str) -> bool:
        return OurDomains(self.settings.server.default_domain).is_ours(name)

    async def add(self, name: str, workspace_slug: str, delegate: bool = False) -> RecordSet:
        """Register `name` as pending with an ownership token and fresh DKIM keys.

        delegate=True: the customer delegates the whole zone to our name servers; we serve
        its records (dnsserver/) and print only what the parent zone publishes: NS (and
        glue), and the ownership TXT that proves the parent's owner asked for this.
        """
        name = store.normalize(name)
        if self._own_domain(name):
            raise DirectoryError(f"{name} is under the default domain "
                                 f"{self.settings.server.default_domain}: it needs no `domain add`")
        token = secrets.token_urlsafe(24)
        async with self.db.acquire() as connection, connection.transaction():
            domain = await store.add_domain(connection, workspace_slug, name, token,
                                            mail_from_domain(name, self.settings),
                                            delegated=delegate)
            await self.keys.create_keys(domain.workspace_id, domain.name, db=connection)
        log.info("domain.added", domain=domain.name, workspace=domain.workspace_slug,
                 state=domain.state, delegated=domain.delegated)
        return await self.record_set(domain)

    async def record_set(self, domain: store.Domain) -> RecordSet:
        if domain.delegated:
            return delegated_domain_records(self.settings, domain.name, domain.workspace_slug,
                                            domain.state, domain.ownership_token)
        keys = await self.keys.active_keys(domain.workspace_id, domain.name)
        return custom_domain_records(self.settings, domain.name, domain.workspace_slug,
                                     domain.state, domain.ownership_token, keys)

    async def default_record_set(self) -> RecordSet:
        """The default domain's records; its DKIM keys are made on first use."""
        domain = self.settings.server.default_domain
        async with self.db.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", DEFAULT_KEYS_LOCK)
            owner = await operator_workspace_id(connection)
            if not await connection.fetchval(
                    """SELECT count(*) FROM dkim_keys WHERE workspace_id = $1 AND domain = $2
                       AND retired_at IS NULL""", owner, domain):
                await self.keys.create_keys(owner, domain, db=connection)
        keys = await self.keys.active_keys(owner, domain)
        return default_domain_records(self.settings, keys)

    async def check(self, name: str) -> tuple[store.Domain, CheckReport]:
        """Resolve every record; all pass -> verified, a failure on a verified one -> degraded.

        A DNS outage (temperror) changes nothing: it says nothing about the records.
        """
        domain = await store.get_domain(self.db, name)
        record_set = await self.record_set(domain)
        report = await DomainChecker(self.resolver, self.settings).check(record_set)
        if report.temperror and not report.failing:
            log.warning("domain.check_inconclusive", domain=domain.name, state=domain.state)
            return domain, report
        updated = await store.record_check(self.db, domain, report.failing)
        if updated.state != domain.state:
            log.info("domain.state_changed", domain=domain.name, workspace=domain.workspace_slug,
                     old=domain.state, new=updated.state, failing=report.failing)
        if updated.state == "degraded":
            log.warning("domain.degraded", domain=domain.name, workspace=domain.workspace_slug,
                        failing=report.failing)
        return updated, report

    async def signing_keys_for(self, workspace_id: int, from_domain: str) -> list[SigningKey]:
        """The keys to sign mail of `workspace_id` From `from_domain` with (outbound, issue 7).

        `<slug>.<default domain>` signs as the default domain (d=<default domain>): DMARC's
        relaxed alignment accepts it (RFC 7489 3.1.1), and the wildcard records leave no
        room for per-workspace key records. A custom domain signs with its own keys, only
        for its own workspace and only once verified. Empty: nothing to sign with (the
        caller must not send unsigned).
        """
        name = store.normalize(from_domain)
        if self._own_domain(name):
            owner = await operator_workspace_id(self.db)
            return await self.keys.signing_keys(owner, self.settings.server.default_domain)
        domain = await store.find_domain(self.db, name)
        if domain is None or domain.workspace_id != workspace_id or not domain.receives:
            log.warning("dkim.no_signing_keys", domain=name, workspace_id=workspace_id,
                        reason="unknown domain" if domain is None else
                        "another workspace's domain" if domain.workspace_id != workspace_id
                        else f"domain {domain.state}")
            return []
        return await self.keys.signing_keys(workspace_id, domain.name)

    async def rotate_dkim(self, name: str) -> RotationStep:
        """Publish a new selector per algorithm; it signs once DNS serves it (`advance`).

        Custom domains (delegated or not) and the default domain alike; the default
        domain's keys belong to the operator workspace.
        """
        owner, name = await self.key_owner(name)
        created = await self.keys.create_keys(owner, name, activate=False)
        log.info("dkim.rotation_started", domain=name, workspace_id=owner,
                 selectors=[k.selector for k in created])
        step = await self.advance_rotation(owner, name)
        return replace(step, created=[k.selector for k in created])

    async def key_owner(self, name: str) -> tuple[int, str]:
        name = store.normalize(name)
        if name == self.settings.server.default_domain:
            return await operator_workspace_id(self.db), name
        domain = await store.get_domain(self.db, name)
        return domain.workspace_id, domain.name

    async def key_records(self, workspace_id: int, name: str,
                          keys: list[DkimKey]) -> list[DnsRecord]:
        """The DKIM records that publish `keys` (what the customer or operator publishes;
        in a delegated zone, what our DNS server serves)."""
        if name == self.settings.server.default_domain:
            record_set = default_domain_records(self.settings, keys)
        else:
            domain = await store.get_domain(self.db, name)
            if domain.workspace_id != workspace_id:
                raise DirectoryError(f"domain {name!r} belongs to another workspace")
            record_set = custom_domain_records(self.settings, domain.name,
                                               domain.workspace_slug, domain.state,
                                               domain.ownership_token, keys)
        wanted = {k.name for k in keys}
        return [r for r in record_set.records
                if r.purpose == "dkim" and r.publisher == "customer" and r.name in wanted]

    async def advance_rotation(self, workspace_id: int, name: str) -> RotationStep:
        """One step of a rotation: a published key that DNS now serves (our zone, for a
        delegated domain; the owner's, once they published it) starts signing; a key
        past its grace period is retired."""
        keys = await self.keys.active_keys(workspace_id, name)
        pending = [k for k in keys if k.activated_at is None]
        activated: list[str] = []
        waiting: list[str] = []
        if pending:
            records = await self.key_records(workspace_id, name, pending)
            report = await DomainChecker(self.resolver, self.settings).check(
                RecordSet(name, "custom", tuple(records)))
            served = {c.record.name for c in report.checks if c.status == "pass"}
            activated = [k.selector for k in pending if k.name in served]
            waiting = [k.selector for k in pending if k.name not in served]
            if activated:
                await self.keys.activate(workspace_id, name, activated,
                                         self.settings.domains.dkim_rotation_grace)
            if waiting:
                log.info("dkim.rotation_waiting", domain=name, selectors=waiting,
                         reason="not served by DNS yet")
        retired = await self.keys.retire_due(workspace_id, name)
        return RotationStep(name, activated=activated, waiting=waiting, retired=retired)

    async def advance_rotations(self) -> list[RotationStep]:
        """`serve`'s periodic step over every domain with a rotation under way."""
        rows = await self.db.fetch(
            """SELECT DISTINCT workspace_id, domain FROM dkim_keys
               WHERE retired_at IS NULL
                 AND (activated_at IS NULL OR retire_after IS NOT NULL)
               ORDER BY domain""")
        steps = []
        for row in rows:
            try:
                steps.append(await self.advance_rotation(row["workspace_id"], row["domain"]))
            except DirectoryError:  # removed meanwhile
                continue
        return steps

    async def remove(self, name: str) -> store.Domain:
        domain = await store.get_domain(self.db, name)
        async with self.db.acquire() as connection, connection.transaction():
            await self.keys.delete_domain_keys(domain.workspace_id, domain.name, db=connection)
            await store.remove_domain(connection, domain)
        log.info("domain.removed", domain=domain.name, workspace=domain.workspace_slug)
        return domain
