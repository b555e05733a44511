"""Outbound through Amazon SES: moto in server mode on loopback is the SESv2 endpoint; the real
server's worker sends raw through aiobotocore and records SES's message id; SES bounce and
complaint notifications (their JSON) then bounce the message and suppress the addresses."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator

import asyncpg
import pytest
from aiobotocore.session import get_session
from moto.core import DEFAULT_ACCOUNT_ID
from moto.server import ThreadedMotoServer
from moto.ses.models import ses_backends

from smtpd_agent.outbound.bounces import BounceProcessor
from smtpd_agent.outbound.queue import is_suppressed
from tests.support import DEFAULT_DOMAIN

from .conftest import make_agent, store_reply, wait_state

# Every wait in here is bounded; a hang fails this test, not the run.
pytestmark = pytest.mark.timeout(60)


REGION = "us-east-1"


@pytest.fixture
def ses_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", REGION)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _host, port = server.get_host_and_port()
    # moto's backends live in this process and outlive a server: start from nothing
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset",
                                                  method="POST"), timeout=10).close()
    yield f"http://127.0.0.1:{port}"
    server.stop()


async def verify_identity(endpoint: str, identity: str) -> None:
    async with get_session().create_client("sesv2", region_name=REGION,
                                           endpoint_url=endpoint) as client:
        await client.create_email_identity(EmailIdentity=identity)


def ses_sent() -> dict[str, object]:
    return {m.id: m for m in ses_backends[DEFAULT_ACCOUNT_ID][REGION].sent_messages}


async def test_ses_delivers_raw_signed_and_records_its_message_id(
        start_server, db, database_url, ses_endpoint):
    await verify_identity(ses_endpoint, f"acme.{DEFAULT_DOMAIN}")
    start_server(**{"outbound.transport": "ses", "outbound.ses_endpoint_url": ses_endpoint,
                    "outbound.ses_region": REGION, "outbound.poll_interval": 0.05,
                    "outbound.timeout": 5})
    agent = await make_agent(db)
    message_id = await store_reply(db, agent, "bob@example.org")
    complained = await store_reply(db, agent, "angry@example.org")
    row = await wait_state(db, message_id, {"sent"})
    other = await wait_state(db, complained, {"sent"})
    assert row["transport"] == "ses" and row["provider_message_id"]
    sent = ses_sent()
    assert row["provider_message_id"] in sent
    raw = sent[row["provider_message_id"]].raw_data
    assert raw.count("DKIM-Signature:") == 2 and "a=ed25519-sha256" in raw
    assert "bob@example.org" in sent[row["provider_message_id"]].destinations

    # SES tells us (SNS envelope) that bob bounced permanently, and angry complained
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        bounces = BounceProcessor(pool)
        notification = {"notificationType": "Bounce",
                        "mail": {"messageId": row["provider_message_id"]},
                        "bounce": {"bounceType": "Permanent", "bounceSubType": "General",
                                   "bouncedRecipients": [{"emailAddress": "bob@example.org"}]}}
        await bounces.receive_ses(json.dumps({"Type": "Notification",
                                              "Message": json.dumps(notification)}))
        complaint = {"eventType": "Complaint", "mail": {"messageId": other["provider_message_id"]},
                     "complaint": {"complaintFeedbackType": "abuse",
                                   "complainedRecipients": [{"emailAddress": "angry@example.org"}]}}
        await bounces.receive_ses(json.dumps(complaint))
    finally:
        await pool.close()
    assert (await wait_state(db, message_id, {"bounced"}))["status"] == "bounced"
    assert await is_suppressed(db, agent.workspace_id, "bob@example.org")
    assert await db.fetchval("SELECT reason FROM suppressions WHERE address = $1",
                             "angry@example.org") == "complaint"
    # a complaint does not unsend the message
    assert (await wait_state(db, complained, {"sent"}))["status"] == "sent"


async def test_ses_refusal_is_a_failure_not_a_bounce(start_server, db, ses_endpoint):
    # no verified identity: SES refuses the sender; nobody is suppressed for it
    start_server(**{"outbound.transport": "ses", "outbound.ses_endpoint_url": ses_endpoint,
                    "outbound.ses_region": REGION, "outbound.poll_interval": 0.05,
                    "outbound.timeout": 5})
    agent = await make_agent(db)
    message_id = await store_reply(db, agent, "bob@example.org")
    row = await wait_state(db, message_id, {"failed"})
    assert "MessageRejected" in row["last_error"]
    assert not await is_suppressed(db, agent.workspace_id, "bob@example.org")
    await asyncio.sleep(0)
