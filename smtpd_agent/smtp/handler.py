"""MAIL and RCPT for aiosmtpd: sender bookkeeping, and RCPT through the shared recipient step."""

from __future__ import annotations

from typing import Any

import structlog

from ..ingress import route_recipient
from ..metrics import Metrics
from ..routing import Router
from ..store.acl import AclCache
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

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        envelope.mail_from = address  # "<>" for the null sender; aiosmtpd needs it non-empty
        envelope.mail_options.extend(mail_options)
        log.debug("smtp.mail_from", mail_from=address, helo=session.host_name)
        return str(replies.MAIL_OK)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        decision = await route_recipient(self.router, address, accepted=len(envelope.rcpt_tos),
                                         max_recipients=self.max_recipients,
                                         mail_from=envelope.mail_from, acl=self.acl)
        if decision.verdict.accepted:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            envelope.accepted.add(decision)
        return str(replies.answer(decision.verdict, "smtp", self.metrics))

    async def handle_VRFY(self, server: Any, session: Any, envelope: Any, address: str) -> str:
        return str(replies.VRFY_CANNOT)
