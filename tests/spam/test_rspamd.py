"""Spam scoring over real SMTP with a real rspamd (tests/rspamd.py), the local Messages API
standing in for the LLM: GTUBE refused, spam held without an agent job until released,
rspamd down handled per spam.required."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import pytest

from tests.agent.conftest import add_acme, agent_overrides
from tests.agent.helpers import RCPT, deliver, mail, wait_jobs
from tests.messages_api import Step
from tests.rspamd import GTUBE, SOFT_REJECT_TOKEN, SPAM_SYMBOL, SPAM_TOKEN
from tests.support import DEFAULT_DOMAIN, send_one

# rspamd's own checks wait for DNS that never answers (0.5 s, bounded); still bounded here.
pytestmark = pytest.mark.timeout(120)


def send(port: int, raw: bytes, mail_from: str = "alice@example.org") -> tuple[int, bytes]:
    """One message over SMTP; the reply to the end of DATA."""
    code, lines = send_one(port, raw, mail_from, RCPT, timeout=60)
    return code, lines[-1]


def cli(database_url: str, *args: str) -> str:
    """`smtpd-agent <args>` in a subprocess against the test's database."""
    env = {**os.environ, "SMTPD_AGENT_DATABASE_URL": database_url,
           "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": DEFAULT_DOMAIN,
           "SMTPD_AGENT_CONFIG": os.devnull}
    result = subprocess.run([sys.executable, "-m", "smtpd_agent", *args], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


async def test_gtube_is_refused_with_550_by_a_real_rspamd(start_server, db, rspamd):
    server = start_server(**{"spam.rspamd": rspamd.url})
    await add_acme(db)
    code, line = send(server.port, mail(subject="hello", body=GTUBE))
    assert code == 550 and line.startswith(b"550 5.7.1 "), line
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    metrics = server.app.runtime.metrics.registry
    assert metrics.get_sample_value("smtpd_agent_spam_results_total",
                                    {"result": "reject"}) == 1


async def test_soft_reject_is_451(start_server, db, rspamd):
    server = start_server(**{"spam.rspamd": rspamd.url})
    await add_acme(db)
    code, line = send(server.port, mail(subject=f"Hello {SOFT_REJECT_TOKEN}"))
    assert line.startswith(b"451 4.7.1 "), line
    assert await db.fetchval("SELECT count(*) FROM messages") == 0


async def test_spam_is_held_from_the_llm_until_released(start_server, db, database_url,
                                                        messages_api, rspamd):
    server = start_server(**agent_overrides(messages_api, **{"spam.rspamd": rspamd.url}))
    await add_acme(db)
    messages_api.queue(Step(text="Hello Alice, order 42 ships tomorrow."),
                       Step(text="Hello Alice, about your offer: no thanks."))
    deliver(server.port, mail(subject=f"Cheap offer {SPAM_TOKEN}", body="Buy now, friend."))
    spam = await db.fetchrow("SELECT * FROM messages")
    assert spam["spam"] is True and spam["spam_status"] == "scored"
    assert spam["spam_action"] == "add header"
    assert 6 <= spam["spam_score"] < 15 and spam["spam_required"] == 15
    assert json.loads(spam["spam_symbols"])[SPAM_SYMBOL] == 8.0
    assert await db.fetchval("SELECT count(*) FROM agent_jobs") == 0

    # The worker is running: ordinary mail after the spam is answered, and the one
    # request the LLM got carries nothing of the spam.
    deliver(server.port, mail(subject="Where is my order?", body="Hello, where is order 42?"))
    [job] = await wait_jobs(db)
    assert job["status"] == "done", job["last_error"]
    [request] = messages_api.requests
    assert SPAM_TOKEN not in json.dumps(request.body)
    ham = await db.fetchrow("SELECT * FROM messages WHERE id = $1", job["message_id"])
    assert (ham["spam"], ham["spam_status"], ham["spam_action"]) == (False, "scored",
                                                                     "no action")

    inbox = await asyncio.to_thread(cli, database_url, "inbox",
                                    f"support@acme.{DEFAULT_DOMAIN}")
    assert "SPAM" in inbox and f"{SPAM_SYMBOL}(8)" in inbox and "(add header)" in inbox
    [held] = json.loads(await asyncio.to_thread(cli, database_url, "quarantine", "list",
                                                "--workspace", "acme", "--json"))
    assert held["id"] == spam["id"] and held["reason"].startswith("spam (rspamd add header")
    assert json.loads(await asyncio.to_thread(
        cli, database_url, "quarantine", "list", "--workspace", "globex", "--json")) == []

    released = await asyncio.to_thread(cli, database_url, "quarantine", "release",
                                       str(spam["id"]))
    assert f"message {spam['id']} released to acme/support" in released
    jobs = await wait_jobs(db, count=2)
    assert [(j["message_id"], j["status"]) for j in jobs] == [
        (ham["id"], "done"), (spam["id"], "done")], [j["last_error"] for j in jobs]
    assert len(messages_api.requests) == 2
    assert SPAM_TOKEN in json.dumps(messages_api.requests[1].body)
    reply = await db.fetchrow("SELECT * FROM messages WHERE direction = 'outbound' "
                              "AND thread_id = $1", spam["thread_id"])
    assert reply is not None and reply["rcpt_to"] == "alice@example.org"
    assert json.loads(await asyncio.to_thread(cli, database_url, "quarantine", "list",
                                              "--json")) == []


@pytest.mark.parametrize("required", [False, True])
async def test_rspamd_down(start_server, db, required, closed_port):
    """Nothing listens on the port: stored unscored (and answered), or 451 when required."""
    server = start_server(**{"spam.rspamd": f"http://127.0.0.1:{closed_port}",
                             "spam.required": required})
    await add_acme(db)
    code, line = send(server.port, mail())
    if required:
        assert line.startswith(b"451 4.7.0 "), line
        assert await db.fetchval("SELECT count(*) FROM messages") == 0
    else:
        assert code == 250, line
        row = await db.fetchrow("SELECT * FROM messages")
        assert (row["spam"], row["spam_status"], row["spam_score"]) == (False, "unscored", None)
        assert await db.fetchval("SELECT count(*) FROM agent_jobs") == 1


async def test_dmarc_quarantine_is_listed_and_release_requeues_its_job(
        agent_server, db, database_url, dns_server, messages_api):
    """Held by DMARC p=quarantine: listed with that reason; release makes the skipped job due
    again, and the worker's own rules still apply (a DMARC failure is never answered)."""
    dns_server.txt("_dmarc.shop.test", "v=DMARC1; p=quarantine")
    deliver(agent_server.port, mail(sender="alice@shop.test"), mail_from="alice@elsewhere.test")
    [job] = await wait_jobs(db)
    assert (job["status"], job["skip_reason"]) == ("skipped", "quarantined")
    [held] = json.loads(await asyncio.to_thread(cli, database_url, "quarantine", "list",
                                                "--json"))
    assert held["id"] == job["message_id"] and held["reason"] == "DMARC quarantine (dmarc=fail)"
    await asyncio.to_thread(cli, database_url, "quarantine", "release", str(held["id"]))
    deadline = asyncio.get_running_loop().time() + 60
    while (await db.fetchval("SELECT skip_reason FROM agent_jobs")) == "quarantined":
        assert asyncio.get_running_loop().time() < deadline, "job not run again"
        await asyncio.sleep(0.05)
    [job] = await wait_jobs(db)
    assert job["status"] == "skipped" and "DMARC fail" in job["skip_reason"], job["skip_reason"]
    assert messages_api.requests == []
    assert await db.fetchval("SELECT released_at IS NOT NULL FROM messages") is True
    result = subprocess.run(
        [sys.executable, "-m", "smtpd_agent", "quarantine", "release", str(held["id"])],
        env={**os.environ, "SMTPD_AGENT_DATABASE_URL": database_url,
             "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": DEFAULT_DOMAIN,
             "SMTPD_AGENT_CONFIG": os.devnull}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and f"no held message {held['id']}" in result.stderr


@pytest.mark.parametrize("up", [True, False])
async def test_readiness_names_rspamd_when_required(start_server, rspamd, up, closed_port):
    url = rspamd.url if up else f"http://127.0.0.1:{closed_port}"
    server = start_server(**{"spam.rspamd": url, "spam.required": True})
    async with aiohttp.ClientSession() as http, \
            http.get(f"{server.http_url}/health/ready") as response:
        body = await response.json()
    assert response.status == (200 if up else 503), body
    assert body["checks"]["rspamd"]["ok"] is up and body["checks"]["rspamd"]["required"]
