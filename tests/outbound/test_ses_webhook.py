"""SES bounce and complaint notifications arriving on the signed SNS webhook (/webhook/ses)
reach the bounce processor: the message SES sent is bounced, the addresses suppressed."""

from __future__ import annotations

import json
import uuid

import aiohttp
import pytest

from smtpd_agent.outbound.queue import enqueue, is_suppressed
from tests.http.test_webhooks import sns  # noqa: F401 - the signing SNS stand-in
from tests.sns import TOPIC, now_stamp

from .conftest import make_agent, store_reply


# Every wait in here is bounded; a hang fails this test, not the run.
pytestmark = pytest.mark.timeout(60)


def feedback(message_id: str, kind: str, address: str) -> dict[str, str]:
    if kind == "Bounce":
        body = {"notificationType": "Bounce", "mail": {"messageId": message_id},
                "bounce": {"bounceType": "Permanent", "bounceSubType": "NoEmail",
                           "bouncedRecipients": [{"emailAddress": address}]}}
    else:
        body = {"notificationType": "Complaint", "mail": {"messageId": message_id},
                "complaint": {"complainedRecipients": [{"emailAddress": address}],
                              "complaintFeedbackType": "abuse"}}
    return {"Type": "Notification", "MessageId": str(uuid.uuid4()), "TopicArn": TOPIC,
            "Message": json.dumps(body), "Timestamp": now_stamp()}


async def sent_via_ses(db, agent, to: str, provider_id: str) -> int:
    async with db.transaction():
        message_id = await store_reply(db, agent, to)
        delivery_id = await enqueue(db, message_id)
    await db.execute("""UPDATE deliveries SET status = 'sent', transport = 'ses',
                        provider_message_id = $2 WHERE id = $1""", delivery_id, provider_id)
    await db.execute("UPDATE delivery_recipients SET state = 'sent' WHERE delivery_id = $1",
                     delivery_id)
    return message_id


async def test_ses_feedback_on_the_sns_webhook(start_server, db, sns):  # noqa: F811
    server = start_server(**{**sns.settings(), "http.port": 0})
    agent = await make_agent(db)
    bounced = await sent_via_ses(db, agent, "nobody@example.org", "ses-0001")
    await sent_via_ses(db, agent, "angry@example.org", "ses-0002")
    url = f"{server.http_url}/webhook/ses"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for body in (feedback("ses-0001", "Bounce", "nobody@example.org"),
                     feedback("ses-0002", "Complaint", "angry@example.org")):
            signed = sns.sign(body)
            async with http.post(url, data=json.dumps(signed),
                                 headers=sns.headers(signed)) as response:
                assert response.status == 200, await response.text()
        forged = feedback("ses-0002", "Bounce", "angry@example.org")
        tampered = {**sns.sign(forged), "Message": forged["Message"].replace("0002", "0001")}
        async with http.post(url, data=json.dumps(tampered),
                             headers=sns.headers(tampered)) as response:
            assert response.status == 403
        async with http.get(f"{server.http_url}/metrics") as response:
            metrics = await response.text()
    # the outbound queue's depth by state is scraped with the others
    assert any('queue="deliveries"' in line and 'state="bounced"' in line
               for line in metrics.splitlines()), metrics[-2000:]
    assert await db.fetchval("SELECT status FROM messages WHERE id = $1", bounced) == "bounced"
    assert await is_suppressed(db, agent.workspace_id, "nobody@example.org")
    assert await db.fetchval("SELECT reason FROM suppressions WHERE address = $1",
                             "angry@example.org") == "complaint"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE direction = 'inbound'") == 0
