"""Health, readiness and metrics over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import re

import pytest

from smtpd_agent.metrics import Metrics
from smtpd_agent.store import directory
from tests.integration.test_postgres_outage import deliver as deliver_tag
from tests.integration.test_postgres_outage import start_postgres, stop_postgres
from tests.support import Dialogue, EmbeddedCluster, ServerThread, make_settings

SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


async def test_liveness_and_readiness_name_each_check(server, http):
    async with http.get(f"{server.http_url}/health") as response:
        assert response.status == 200 and (await response.json())["status"] == "ok"
    async with http.get(f"{server.http_url}/health/ready") as response:
        body = await response.json()
    assert response.status == 200, body
    assert body["ready"] is True
    assert body["checks"]["postgres"]["ok"] and body["checks"]["migrations"]["ok"]
    assert body["checks"]["clamd"] == {"ok": True, "required": False,
                                       "detail": "scanning not configured"}
    assert body["checks"]["rspamd"] == {"ok": True, "required": False,
                                        "detail": "spam scoring not configured"}


@pytest.fixture
def own_cluster(tmp_path):
    cluster = EmbeddedCluster(tmp_path / "pg")
    yield cluster
    cluster.stop()


async def test_readiness_flips_when_postgres_goes_away_and_back(own_cluster, tmp_path,
                                                               dns_server, http):
    url = await own_cluster.new_database()
    running = ServerThread(make_settings(url, tmp_path / "state", **{
        "database.connect_timeout": 1, "dns.nameservers": [dns_server.nameserver]})).start()
    try:
        ready = f"{running.http_url}/health/ready"
        async with http.get(ready) as response:
            assert response.status == 200
        await asyncio.to_thread(stop_postgres, own_cluster)
        async with http.get(ready) as response:
            body = await response.json()
        assert response.status == 503 and body["ready"] is False
        assert body["checks"]["postgres"]["ok"] is False
        async with http.get(f"{running.http_url}/health") as response:
            assert response.status == 200  # alive, just not ready
        await asyncio.to_thread(start_postgres, own_cluster)
        for _ in range(50):
            async with http.get(ready) as response:
                if response.status == 200:
                    break
            await asyncio.sleep(0.1)
        assert response.status == 200
    finally:
        running.stop()


async def test_readiness_reports_pending_migrations(server, http, db):
    await db.execute("DELETE FROM schema_migrations WHERE version = "
                     "(SELECT max(version) FROM schema_migrations)")
    async with http.get(f"{server.http_url}/health/ready") as response:
        body = await response.json()
    assert response.status == 503
    assert body["checks"]["postgres"]["ok"] is True
    assert body["checks"]["migrations"]["ok"] is False
    assert body["checks"]["migrations"]["detail"].startswith("pending: ")


async def test_metrics_move_on_accept_and_reject(server, http):
    async def scrape() -> str:
        async with http.get(f"{server.http_url}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return await response.text()

    before = await scrape()
    assert (await asyncio.to_thread(deliver_tag, server.port, "counted"))[0] == 250
    dialogue = Dialogue.open(server.port)
    dialogue.reply()
    dialogue.command("EHLO client.example.org")
    dialogue.command("MAIL FROM:<alice@example.org>")
    assert dialogue.command("RCPT TO:<nobody@acme.agents.test>")[0] == 550
    assert dialogue.command("RCPT TO:<x@elsewhere.example>")[0] == 550
    dialogue.command("QUIT")
    after = await scrape()

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("smtpd_agent_messages_accepted_total", transport="smtp") == 1
    assert moved("smtpd_agent_messages_rejected_total", transport="smtp", stage="rcpt",
                 reason="unknown mailbox", code="550") == 1
    assert moved("smtpd_agent_messages_rejected_total", transport="smtp", stage="rcpt",
                 reason="relay denied", code="550") == 1
    assert moved("smtpd_agent_smtp_sessions_total") >= 2
    assert moved("smtpd_agent_auth_verdicts_total", check="dmarc") == 1
    assert moved("smtpd_agent_store_seconds_count") == 1
    # the accepted message made an agent job (in whatever state a worker left it)
    assert metric(after, "smtpd_agent_queue_depth", queue="agent_jobs") == 1


async def test_two_servers_count_apart(start_server, http, db):
    first, second = start_server(), start_server()
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support")
    assert (await asyncio.to_thread(deliver_tag, first.port, "only-first"))[0] == 250
    texts = []
    for running in (first, second):
        async with http.get(f"{running.http_url}/metrics") as response:
            texts.append(await response.text())
    assert metric(texts[0], "smtpd_agent_messages_accepted_total", transport="smtp") == 1
    assert metric(texts[1], "smtpd_agent_messages_accepted_total", transport="smtp") == 0


async def test_openapi_is_served(server, http):
    async with http.get(f"{server.http_url}/openapi.json") as response:
        spec = await response.json()
    assert spec["openapi"].startswith("3.")
    for path in ("/health/ready", "/api/v1/workspaces/{slug}/agents/{handle}/inbox",
                 "/webhook/ses", "/webhook/sendgrid", "/webhook/mailgun", "/webhook/postmark"):
        assert path in spec["paths"]


async def test_http_errors_are_json_not_500(server, http):
    async with http.get(f"{server.http_url}/no/such/path") as response:
        assert response.status == 404 and (await response.json())["error"]
    async with http.post(f"{server.http_url}/health") as response:
        assert response.status == 405 and "GET" in response.headers["Allow"]
        assert (await response.json())["error"]


async def test_queue_depths_are_read_from_postgres_at_scrape_time(db):
    metrics = Metrics(queue_tables=("test_jobs", "missing_table"))
    await db.execute("CREATE TABLE test_jobs (id serial, status text)")
    await db.execute("INSERT INTO test_jobs (status) VALUES ('pending'), ('pending'), ('done')")
    await metrics.refresh_queues(db)
    text = metrics.render().decode()
    assert metric(text, "smtpd_agent_queue_depth", queue="test_jobs", state="pending") == 2
    assert metric(text, "smtpd_agent_queue_depth", queue="test_jobs", state="done") == 1
    await db.execute("DELETE FROM test_jobs WHERE status = 'done'")
    await metrics.refresh_queues(db)
    assert 'state="done"' not in metrics.render().decode()
