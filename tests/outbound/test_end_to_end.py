"""The whole way round: mail in over SMTP -> the agent (local Messages API through the real SDK)
-> its reply enqueued in the agent's transaction -> signed and out through the relay sink; and
a correspondent on the suppression list gets no reply at all (a recorded skip)."""

from __future__ import annotations

import asyncio

import pytest

from smtpd_agent.outbound.queue import suppress
from tests.agent.conftest import (  # noqa: F401
    add_acme,
    agent_overrides,
    authenticated_senders,
    messages_api,
)
from tests.agent.helpers import deliver, mail, parse, wait_jobs
from tests.messages_api import Step
from tests.support import DEFAULT_DOMAIN

from .conftest import fast, wait_state

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("authenticated_senders")]


async def test_agent_reply_leaves_through_the_relay(start_server, db, messages_api,  # noqa: F811
                                                    relay):
    sink, url = relay
    server = start_server(**agent_overrides(messages_api, **fast(url)))
    await add_acme(db)
    messages_api.queue(Step(text="Hello Alice,\n\nOrder 42 ships tomorrow.\n\nAcme Support"))
    deliver(server.port, mail(message_id="<q42@example.org>"))
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    assert received.rcpt_tos == ["alice@example.org"]
    assert received.mail_from.endswith(f"@bounce.{DEFAULT_DOMAIN}")
    reply = parse(received.data)
    assert reply["In-Reply-To"] == "<q42@example.org>"
    assert len(reply.get_all("DKIM-Signature")) == 2
    # the sink has the message a moment before the worker records the attempt
    message_id = await db.fetchval("SELECT id FROM messages WHERE direction = 'outbound'")
    await wait_state(db, message_id, {"sent"})
    row = await db.fetchrow("""SELECT m.status, d.status, d.attempts FROM messages m
                               JOIN deliveries d ON d.message_id = m.id
                               WHERE m.direction = 'outbound'""")
    assert tuple(row) == ("sent", "sent", 1)


async def test_no_reply_to_a_suppressed_correspondent(start_server, db, messages_api,  # noqa: F811
                                                      relay):
    sink, url = relay
    server = start_server(**agent_overrides(messages_api, **fast(url)))
    await add_acme(db)
    workspace_id = await db.fetchval("SELECT id FROM workspaces WHERE slug = 'acme'")
    await suppress(db, workspace_id, "alice@example.org", "complaint", source="test")
    deliver(server.port, mail())
    [job] = await wait_jobs(db)
    assert (job["status"], job["skip_reason"]) == ("skipped", "correspondent suppressed")
    assert messages_api.requests == []  # the LLM was never asked
    await asyncio.sleep(0.3)
    assert sink.received == [] and sink.rcpt_times == []
