"""The outbound worker: claims due deliveries, signs once, sends, records what came back.

Place: a Service of `serve` (app.SERVICES) and of `smtpd-agent outbound-worker`;
any number of them, on any host, share the queue through SKIP LOCKED claims.
Decisions are decisions.py's; this module only sequences the I/O.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog

from ..addresses import OurDomains, domain_of
from ..config import Settings
from ..domains import Domains
from ..domains.keys import KeyStoreError
from ..runtime import Runtime
from ..store import domains as domain_store
from ..store.lease import attempt_claimed, poll, stop_polling
from . import queue
from .decisions import decide_delivery
from .signing import SigningError, sign_message
from .transports import Transport, build_transport
from .verp import bounce_domain, verp_address

log = structlog.get_logger(__name__)

# Polls between sweeps for outbound messages that were stored without `enqueue`.
SWEEP_EVERY = 10


@dataclass(frozen=True)
class Prepared:
    mail_from: str
    signed: bytes


class OutboundWorker:
    """One queue consumer with one transport (its relay connection is reused across messages)."""

    def __init__(self, runtime: Runtime, transport: Transport | None = None) -> None:
        self.db: asyncpg.Pool = runtime.pool
        self.settings: Settings = runtime.settings
        self.domains = Domains.open(runtime.pool, runtime.settings, runtime.resolver)
        self.transport = transport or build_transport(self.settings.outbound,
                                                      self.settings.server.hostname)
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.domains.keys.check_secret()
        except KeyStoreError as error:  # said at start, not first at the first reply
            log.error("outbound.key_secret_unusable", error=str(error))
        if self.transport is None:
            log.warning("outbound.disabled", reason="outbound.relay is not set: replies stay "
                        "queued until a transport is configured")
        else:
            await self.transport.start()
        self._task = asyncio.create_task(self._run(), name="outbound-worker")

    def wake(self) -> None:
        """Look at the queue now rather than at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        # an attempt in flight finishes (bounded by the transport timeout)
        await stop_polling(self._task, stopping=self._stopping, wake=self._wake,
                           grace=self.settings.outbound.timeout + 5)
        self._task = None
        if self.transport is not None:
            await self.transport.close()
        log.info("outbound.stopped")

    async def _run(self) -> None:
        settings = self.settings.outbound
        polls = 0

        async def step() -> bool:
            nonlocal polls
            if polls % SWEEP_EVERY == 0:
                await queue.sweep(self.db)
            polls += 1
            if self.transport is None:
                return False
            return await self.run_once() >= settings.batch_size

        await poll(step, interval=settings.poll_interval, stopping=self._stopping,
                   wake=self._wake, name="outbound")

    async def run_once(self) -> int:
        """Claim one batch and attempt each delivery in it; how many were claimed."""
        settings = self.settings.outbound
        claimed = await queue.claim(self.db, settings.batch_size, settings.lease)

        async def give_back(delivery: queue.Delivery) -> None:
            await queue.release(self.db, delivery, 0.0)  # at once rather than after its lease

        return await attempt_claimed(
            claimed, self.attempt, release=give_back, concurrency=settings.concurrency,
            stopping=self._stopping, lease_lost="outbound.lease_lost",
            failed="outbound.attempt_error")

    async def attempt(self, delivery: queue.Delivery) -> None:
        assert self.transport is not None
        started = datetime.now(UTC)
        fields = dict(delivery_id=delivery.id, workspace_id=delivery.workspace_id,
                      message_id=delivery.message_id, attempt=delivery.attempts)
        if delivery.signed is None or delivery.mail_from is None:
            try:
                prepared = await self.prepare(delivery)
            except KeyStoreError as error:
                # This host cannot open the keys (a missing or different key secret): another
                # host, or this one once fixed, can. Never send unsigned, never drop the reply.
                age = (started - delivery.created_at).total_seconds()
                if age > self.settings.outbound.give_up_after:
                    log.error("outbound.signing_failed", error=str(error), **fields)
                    await queue.fail(self.db, delivery, started, f"DKIM signing failed: {error}")
                    return
                retry_in = self.settings.outbound.retry_base
                log.error("outbound.key_secret_unusable", error=str(error), retry_in=retry_in,
                          **fields)
                await queue.release(self.db, delivery, retry_in)
                return
            except SigningError as error:
                # never send unsigned: the message fails, with the reason recorded
                log.error("outbound.signing_failed", error=str(error), **fields)
                await queue.fail(self.db, delivery, started, f"DKIM signing failed: {error}")
                return
            await queue.store_prepared(self.db, delivery, prepared.mail_from, prepared.signed)
            signed, mail_from = prepared.signed, prepared.mail_from
        else:
            signed, mail_from = delivery.signed, delivery.mail_from
        recipients = await queue.pending_recipients(self.db, delivery)
        reason = "no recipient left to send to"
        if recipients:
            # where mail leaves: whoever queued it, the allow/block lists have the last word
            recipients = await queue.block_refused(self.db, delivery, recipients)
            reason = "every recipient is blocked by the allow/block lists"
        if not recipients:
            await queue.fail(self.db, delivery, started, reason)
            return
        # SES writes its own MAIL FROM; it takes the sending identity (the From address).
        envelope_from = delivery.from_address if self.transport.name == "ses" else mail_from
        result = await self.transport.send(envelope_from, recipients, signed)
        age = (datetime.now(UTC) - delivery.created_at).total_seconds()
        next_ = decide_delivery([r.outcome.kind for r in result.recipients], delivery.attempts,
                                age, self.settings.outbound)
        error = None
        if next_.state != "sent":
            error = "; ".join(f"{r.address}: {r.code or 'no reply'} {r.text}"
                              for r in result.recipients if r.outcome.kind != "sent")
            if next_.give_up:
                error = f"gave up after {delivery.attempts} attempts in {age:.0f}s: {error}"
        await queue.finish_attempt(self.db, delivery, started, self.transport.name,
                                   result.recipients, next_, result.provider_message_id, error)
        log.info(f"outbound.{next_.state}", transport=self.transport.name,
                 recipients=[(r.address, r.code) for r in result.recipients],
                 provider_message_id=result.provider_message_id, retry_in=next_.retry_in,
                 gave_up=next_.give_up, error=error[:300] if error else None, **fields)

    async def prepare(self, delivery: queue.Delivery) -> Prepared:
        """Sign with the From domain's keys and choose the VERP Return-Path; done once."""
        from_domain = domain_of(delivery.from_address)
        if not from_domain:
            raise SigningError("the message has no From address")
        keys = await self.domains.signing_keys_for(delivery.workspace_id, from_domain)
        default = self.settings.server.default_domain
        own = OurDomains(default).is_ours(from_domain)
        if not keys and own:
            # the default domain's keys are made on first use (as `dns-records` would)
            await self.domains.default_record_set()
            keys = await self.domains.signing_keys_for(delivery.workspace_id, from_domain)
        if not keys:
            raise SigningError(f"no DKIM keys for {from_domain}")
        signed = await asyncio.to_thread(sign_message, delivery.raw, keys)
        custom = None if own else await domain_store.find_domain(self.db, from_domain)
        domain = bounce_domain(from_domain, default,
                               self.settings.domains.default_mail_from_label,
                               custom.mail_from if custom and
                               custom.workspace_id == delivery.workspace_id else None)
        return Prepared(verp_address(self.settings.outbound.verp_prefix, delivery.verp_token,
                                     domain), signed)
