"""Transports: how a signed message leaves, an SMTP relay (aiosmtplib) or Amazon SES (SESv2).

Place: the worker hands a transport the Return-Path, the recipients and the
signed bytes; the transport does the I/O and returns every recipient's reply
as data (`SendResult`), never raising for a remote refusal or an outage, so
that decisions.py alone says what the replies mean.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import re
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any, Protocol

import aiosmtplib
import structlog

from ..config import OutboundSettings
from .decisions import RecipientResult, SendResult, Stage, provider_id_from_reply
from ..relay_url import RelayUrl, parse_relay_url

log = structlog.get_logger(__name__)

ENHANCED_PREFIX = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


class Transport(Protocol):
    name: str

    async def start(self) -> None: ...
    async def send(self, mail_from: str, recipients: Sequence[str], data: bytes) -> SendResult: ...
    async def close(self) -> None: ...


def _enhanced(text: str) -> str | None:
    match = ENHANCED_PREFIX.match(text)
    return match.group(1) if match else None


def _all(recipients: Sequence[str], code: int | None, text: str, stage: Stage) -> SendResult:
    return SendResult(tuple(RecipientResult(r, code, _enhanced(text), text, stage)
                            for r in recipients))


class SmtpRelay:
    """A smarthost: connections kept open and reused between messages (RSET between them).

    One connection per concurrent send; an idle one goes back to the pool, one that
    failed mid-transaction is closed (its state is unknown).
    """

    name = "smtp"

    def __init__(self, relay: RelayUrl, timeout: float, local_hostname: str,
                 ca_file: str = "") -> None:
        self.relay = relay
        # verified always (RFC 8314 / RFC 7672 spirit for a configured smarthost)
        self.tls_context = ssl.create_default_context(cafile=ca_file or None)
        self.timeout = timeout
        self.local_hostname = local_hostname
        self._idle: list[aiosmtplib.SMTP] = []

    async def start(self) -> None:
        """Connections are opened on first send: a relay that is down must not stop `serve`."""

    async def _connect(self) -> aiosmtplib.SMTP:
        relay = self.relay
        client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port,
                                 use_tls=relay.tls == "implicit",
                                 start_tls=relay.tls == "starttls",
                                 tls_context=None if relay.tls == "none" else self.tls_context,
                                 timeout=self.timeout, local_hostname=self.local_hostname)
        try:
            await client.connect()
            if relay.username:
                await client.login(relay.username, relay.password)
        except BaseException:
            client.close()  # a failed STARTTLS or AUTH must not leak the socket
            raise
        log.info("outbound.relay_connected", relay=relay.safe)
        return client

    async def _checkout(self) -> aiosmtplib.SMTP:
        """An idle connection that still answers RSET, or a new one."""
        while self._idle:
            client = self._idle.pop()
            if not client.is_connected:
                continue
            try:
                await client.rset()
                return client
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                client.close()
        return await self._connect()

    async def send(self, mail_from: str, recipients: Sequence[str], data: bytes) -> SendResult:
        client = None
        try:
            client = await self._checkout()
            result = await self._transaction(client, mail_from, recipients, data)
        except aiosmtplib.SMTPResponseException as error:
            # AUTH or STARTTLS refused: about the relay and us, not the recipients
            if client is not None:
                client.close()
            return _all(recipients, error.code, error.message, "mail")
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as error:
            if client is not None:
                client.close()
            return _all(recipients, None, f"{type(error).__name__}: {error}", "connect")
        self._idle.append(client)
        return result

    async def _transaction(self, client: aiosmtplib.SMTP, mail_from: str,
                           recipients: Sequence[str], data: bytes) -> SendResult:
        try:
            await client.mail(mail_from)
        except aiosmtplib.SMTPResponseException as error:
            return _all(recipients, error.code, error.message, "mail")
        refused: dict[str, RecipientResult] = {}
        accepted = []
        for address in recipients:
            try:
                await client.rcpt(address)
                accepted.append(address)
            except aiosmtplib.SMTPResponseException as error:
                refused[address] = RecipientResult(address, error.code, _enhanced(error.message),
                                                   error.message, "rcpt")
        provider_id = None
        if not accepted:
            await client.rset()
            return SendResult(tuple(refused[r] for r in recipients))
        try:
            response = await client.data(data)
        except aiosmtplib.SMTPResponseException as error:
            done = {r: RecipientResult(r, error.code, _enhanced(error.message), error.message,
                                       "data") for r in accepted}
        else:
            provider_id = provider_id_from_reply(response.message)
            done = {r: RecipientResult(r, response.code, _enhanced(response.message),
                                       response.message, "data") for r in accepted}
        return SendResult(tuple({**refused, **done}[r] for r in recipients), provider_id)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            if client.is_connected:
                try:
                    await client.quit()
                except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                    client.close()


# SES errors that say "later", not "never" (throttling, the service itself).
SES_TRANSIENT = {"TooManyRequestsException", "LimitExceededException", "Throttling",
                 "ThrottlingException", "ServiceUnavailable", "InternalFailure",
                 "SendingPausedException"}


class SesTransport:
    """Amazon SES raw send through SESv2 `SendEmail`, one long-lived aiobotocore client.

    SES writes its own MAIL FROM (its custom MAIL FROM domain feature), so the
    VERP address cannot travel; bounces come back as SES notifications and are
    matched by the SES message id stored with the delivery.
    """

    name = "ses"

    def __init__(self, settings: OutboundSettings) -> None:
        self.settings = settings
        self._stack = AsyncExitStack()
        self._client: Any = None

    async def start(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        settings = self.settings
        region = (settings.ses_region or os.environ.get("AWS_REGION")
                  or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        config = AioConfig(connect_timeout=settings.timeout, read_timeout=settings.timeout,
                           retries={"max_attempts": 2, "mode": "standard"})
        self._client = await self._stack.enter_async_context(get_session().create_client(
            "sesv2", region_name=region, endpoint_url=settings.ses_endpoint_url or None,
            config=config))
        log.info("outbound.ses_ready", region=region,
                 endpoint=settings.ses_endpoint_url or "aws")

    async def send(self, mail_from: str, recipients: Sequence[str], data: bytes) -> SendResult:
        from botocore.exceptions import BotoCoreError, ClientError

        if self._client is None:
            await self.start()
        request: dict[str, Any] = {"Destination": {"ToAddresses": list(recipients)},
                                   "Content": {"Raw": {"Data": data}}}
        if mail_from:
            request["FromEmailAddress"] = mail_from
        if self.settings.ses_configuration_set:
            request["ConfigurationSetName"] = self.settings.ses_configuration_set
        try:
            response = await self._client.send_email(**request)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            text = f"SES {code}: {error.response.get('Error', {}).get('Message', '')}"
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            transient = code in SES_TRANSIENT or status >= 500
            # not about the recipients: never a hard bounce (that comes as a notification)
            return _all(recipients, None if transient else 554, text,
                        "connect" if transient else "mail")
        except (BotoCoreError, OSError, asyncio.TimeoutError) as error:
            return _all(recipients, None, f"{type(error).__name__}: {error}", "connect")
        message_id = str(response.get("MessageId", ""))
        return SendResult(tuple(RecipientResult(r, 250, "2.0.0", f"SES accepted {message_id}",
                                                "api") for r in recipients),
                          message_id or None)

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None


def build_transport(settings: OutboundSettings, local_hostname: str) -> Transport | None:
    """The configured transport; None when nothing is configured (mail stays queued)."""
    if settings.transport == "ses":
        return SesTransport(settings)
    if not settings.relay:
        return None
    return SmtpRelay(parse_relay_url(settings.relay), settings.timeout, local_hostname,
                     settings.relay_ca_file)
