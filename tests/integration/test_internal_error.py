"""An unexpected exception inside a session answers 451 4.3.0 naming the session, never a 5xx."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from smtpd_agent.config import SmtpSettings
from smtpd_agent.smtp import replies
from smtpd_agent.record import ReceivedContent
from smtpd_agent.smtp.server import AgentSMTP, ConnectionLimits, Sessions
from smtpd_agent.smtp.session import NativeSession


class AcceptEveryone:
    async def handle_MAIL(self, server, session, envelope, address, options):
        envelope.mail_from = address
        return str(replies.MAIL_OK)

    async def handle_RCPT(self, server, session, envelope, address, options):
        envelope.rcpt_tos.append(address)
        return str(replies.RCPT_OK)


async def broken_pipeline(content: ReceivedContent) -> replies.Reply:
    raise RuntimeError("the store exploded")


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if line[3:4] != b"-":
            return line.rstrip()


@pytest.mark.parametrize("layer", [AgentSMTP, NativeSession], ids=["aiosmtpd", "native"])
async def test_unexpected_exception_is_a_451_with_the_session_id(layer):
    loop = asyncio.get_running_loop()
    sessions: list[AgentSMTP | NativeSession] = []

    def factory() -> AgentSMTP | NativeSession:
        session = layer(AcceptEveryone(), settings=SmtpSettings(),  # type: ignore[arg-type]
                        limits=ConnectionLimits(10, 10), deliver=broken_pipeline,
                        hostname="mx.test", sessions=Sessions(), loop=loop)
        sessions.append(session)
        return session

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with structlog.testing.capture_logs() as events:
            await read_reply(reader)
            for command in (b"EHLO c.test", b"MAIL FROM:<a@b.test>", b"RCPT TO:<x@y.test>",
                            b"DATA"):
                writer.write(command + b"\r\n")
                await read_reply(reader)
            writer.write(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            reply = await read_reply(reader)
            writer.write(b"NOOP\r\n")
            after = await read_reply(reader)
        assert reply.startswith(b"451 4.3.0 ")
        assert f"(session {sessions[0].session_id})".encode() in reply
        assert b"RuntimeError" not in reply and b"exploded" not in reply
        assert after.startswith(b"250")  # the session goes on
        assert [e["error"] for e in events if e["event"] == "smtp.internal_error"] == [
            "RuntimeError"]
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
