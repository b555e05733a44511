"""MAIL and RCPT decisions for aiosmtpd: sender bookkeeping, routing, recipient limits."""

from __future__ import annotations

from typing import Any

import structlog

from ..metrics import Metrics
from ..record import Recipient
from ..routing import RouteKind, Router
from ..store.acl import AclCache
from ..store.database import DatabaseUnavailable
from . import replies

log = structlog.get_logger("smtpd_agent.smtp")


class SessionHandler:
    """aiosmtpd handler hooks; one instance serves every session."""

    def __init__(self, router: Router, max_recipients: int,
                 metrics: Metrics | None = None, acl: AclCache | None = None) -> None:
        self.router = router
        self.max_recipients = max_recipients
        self.metrics = metrics
        self.acl = acl

    def _refused(self, reason: str, reply: replies.Reply) -> str:
        if self.metrics is not None:
            self.metrics.rejected_reply("smtp", "rcpt", reason, reply.code)
        return str(reply)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        envelope.mail_from = address  # "<>" for the null sender; aiosmtpd needs it non-empty
        envelope.mail_options.extend(mail_options)
        log.debug("smtp.mail_from", mail_from=address, helo=session.host_name)
        return str(replies.MAIL_OK)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.max_recipients:
            log.info("smtp.rcpt_rejected", rcpt=address, reason="too many recipients")
            return self._refused("too many recipients", replies.TOO_MANY_RECIPIENTS)
        try:
            route = await self.router.route(address)
        except DatabaseUnavailable as error:
            log.error("smtp.rcpt_tempfail", rcpt=address, reason="routing lookup failed",
                      error=str(error))
            return self._refused("routing lookup failed", replies.TEMP_ROUTING_FAILURE)
        if route.kind is RouteKind.RELAY_DENIED:
            log.info("smtp.rcpt_rejected", rcpt=address, mail_from=envelope.mail_from,
                     reason=route.reason, **({"hint": route.hint} if route.hint else {}))
            return self._refused(route.reason or "relay denied", replies.RELAY_DENIED)
        if route.kind is RouteKind.BOUNCE and route.verp_token is not None:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            envelope.bounce_tokens.append(route.verp_token)
            log.debug("smtp.rcpt_accepted", rcpt=address, route="bounce")
            return str(replies.RCPT_OK)
        if route.kind is RouteKind.UNKNOWN_MAILBOX or route.mailbox is None:
            log.info("smtp.rcpt_rejected", rcpt=address, mail_from=envelope.mail_from,
                     reason="unknown mailbox")
            return self._refused("unknown mailbox", replies.MAILBOX_UNKNOWN)
        mailbox = route.mailbox
        if self.acl is not None and envelope.mail_from not in ("", "<>", None):
            try:
                decision = await self.acl.receiving(mailbox.workspace_id, mailbox.agent_id,
                                                    envelope.mail_from)
            except DatabaseUnavailable as error:
                log.error("smtp.rcpt_tempfail", rcpt=address, reason="acl lookup failed",
                          error=str(error))
                return self._refused("acl lookup failed", replies.TEMP_ROUTING_FAILURE)
            if decision.refused:
                log.info("smtp.rcpt_rejected", rcpt=address, mail_from=envelope.mail_from,
                         reason="sender refused by acl", acl=decision.reason)
                return self._refused("sender refused by acl", replies.SENDER_REFUSED)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.recipients.append(Recipient(address=address, mailbox=route.mailbox, tag=route.tag))
        log.debug("smtp.rcpt_accepted", rcpt=address, workspace=route.mailbox.workspace_slug,
                 agent=route.mailbox.handle)
        return str(replies.RCPT_OK)

    async def handle_VRFY(self, server: Any, session: Any, envelope: Any, address: str) -> str:
        return str(replies.VRFY_CANNOT)
