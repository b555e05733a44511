"""`smtpd-agent worker` processes against one Postgres: crash recovery and racing workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smtpd_agent.config import DatabaseSettings
from smtpd_agent.message import parse_message
from smtpd_agent.record import Envelope, InboundMessage, Mailbox, Recipient
from smtpd_agent.store import directory
from smtpd_agent.store.database import create_pool
from smtpd_agent.store.messages import Verdicts, store_inbound
from tests.agent.conftest import add_acme, agent_overrides
from tests.agent.helpers import deliver, mail, wait_jobs
from tests.messages_api import API_KEY, MessagesAPI, Step
from tests.support import DEFAULT_DOMAIN

# Every wait in here is bounded; a hang fails this test, not the run.
pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def spawn_worker(database_url: str, messages_api: MessagesAPI,
                 tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `smtpd-agent worker` in its own process; stopped (or found killed) at the end."""
    started: list[subprocess.Popen[bytes]] = []
    config = tmp_path / "empty.toml"
    config.write_text("")

    def spawn(concurrency: int = 1, **settings: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SMTPD_AGENT_", "ANTHROPIC_", "DATABASE_URL"))}
        env.update({"DATABASE_URL": database_url, "ANTHROPIC_API_KEY": API_KEY,
                    "ANTHROPIC_BASE_URL": messages_api.base_url,
                    "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": DEFAULT_DOMAIN,
                    "SMTPD_AGENT_LOG_FORMAT": "json", "SMTPD_AGENT_AGENT_POLL_INTERVAL": "0.05",
                    "SMTPD_AGENT_AGENT_BACKOFF_BASE": "0.3"})
        env.update({f"SMTPD_AGENT_AGENT_{k.upper()}": v for k, v in settings.items()})
        log_path = tmp_path / f"worker{len(started)}.log"
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [sys.executable, "-m", "smtpd_agent", "worker", "--config", str(config),
                 "--concurrency", str(concurrency)],
                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        process.log_path = log_path  # type: ignore[attr-defined]
        started.append(process)
        return process

    yield spawn
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def wait_started(process: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = Path(process.log_path).read_text()  # type: ignore[attr-defined]
        if "agent.workers.started" in output:
            return
        assert process.poll() is None, output
        time.sleep(0.05)
    raise AssertionError("worker did not start")


async def test_killed_worker_job_is_retaken_after_its_lease(start_server, db, messages_api,
                                                            spawn_worker):
    server = start_server(**agent_overrides(messages_api, **{"agent.workers": 0}))
    await add_acme(db)
    lease = 2.0
    workers = [spawn_worker(lease=str(lease), timeout="1.5") for _ in range(2)]
    for worker in workers:
        wait_started(worker)
    messages_api.queue(Step("slow", delay=30.0))
    deliver(server.port, mail())
    messages_api.wait_for_requests(1)
    job = await db.fetchrow("SELECT * FROM agent_jobs")
    assert job["status"] == "running"
    victim = next(w for w in workers if job["worker"].split(":")[1] == str(w.pid))
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    victim.wait(5)

    [job] = await wait_jobs(db, timeout=60)
    assert job["status"] == "done" and job["attempts"] == 2
    assert job["worker"].split(":")[1] != str(victim.pid)
    _, second = messages_api.requests
    assert second.at - killed_at >= lease - 0.5  # not before the lease ran out
    assert await db.fetchval("SELECT count(*) FROM messages WHERE direction = 'outbound'") == 1


async def store_many(database_url: str, count: int) -> None:
    """`count` inbound messages through the real store function (jobs in its transaction)."""
    pool = await create_pool(database_url, DatabaseSettings(pool_max=4))
    try:
        agent = await directory.get_agent(pool, "acme", "support")
        mailbox = Mailbox(agent.workspace_id, "acme", agent.id, "support", f"acme.{DEFAULT_DOMAIN}")
        for index in range(count):
            sender = f"user{index}@example.org"
            raw = mail(f"question {index}", sender=sender, message_id=f"<q{index}@example.org>")
            envelope = Envelope("s", "127.0.0.1", "client.test", sender,
                                (Recipient(mailbox.address, mailbox),))
            message = InboundMessage(envelope, raw, parse_message(raw))
            await store_inbound(pool, message, Verdicts(dmarc="pass", scan_status="skipped"),
                                30, f"q{index}")
    finally:
        await pool.close()


async def test_two_workers_race_over_200_jobs_each_answered_once(start_server, db, database_url,
                                                                 messages_api, spawn_worker):
    start_server(**agent_overrides(messages_api, **{"agent.workers": 0}))
    await add_acme(db)
    workers = [spawn_worker(concurrency=4, agent_replies_per_hour="1000",
                            new_recipients_per_day="1000") for _ in range(2)]
    for worker in workers:
        wait_started(worker)
    started = time.monotonic()
    await store_many(database_url, 200)
    jobs = await wait_jobs(db, count=200, timeout=180)
    elapsed = time.monotonic() - started
    assert {j["status"] for j in jobs} == {"done"}, {j["last_error"] for j in jobs}
    assert all(j["attempts"] == 1 for j in jobs)
    replies = await db.fetch("SELECT thread_id, in_reply_to, rcpt_to FROM messages "
                             "WHERE direction = 'outbound'")
    assert len(replies) == 200
    assert len({tuple(r["in_reply_to"]) for r in replies}) == 200
    assert len({r["rcpt_to"] for r in replies}) == 200
    assert len(messages_api.requests) == 200
    pids = {j["worker"].split(":")[1] for j in jobs}
    assert pids == {str(w.pid) for w in workers}
    shares = {pid: sum(1 for j in jobs if j["worker"].split(":")[1] == pid) for pid in pids}
    print(f"200 jobs by 2 workers x 4 in {elapsed:.2f}s, per worker process: {shares}")
