"""Two `smtpd-agent serve` nodes on two loopback addresses (127.0.0.2 and 127.0.0.3), each with
its own state directory, one Postgres (the same DATABASE_URL), agent and outbound workers on
both: the "more than one host" of docs/operations.md, proved over real sockets.

What must hold: every message delivered to either node is answered exactly once; kill -9 of
one node loses no message it answered 250 for, and the jobs and deliveries it had leased are
finished by the other node once the lease runs out; a routing change made through one node
(CLI or API) is seen by the other at once, not after its cache TTL; the agent's rate limits
count replies of both nodes together, while the per-client edge rates are per node (said in
the docs); each node's /metrics counts its own traffic and shows the shared queues alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import smtplib
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from smtpd_agent.cli import build_parser, settings_from, with_database
from smtpd_agent.store.apikeys import Scope, create_key
from tests.agent.conftest import (  # noqa: F401 - fixtures
    add_acme,
    agent_overrides,
    authenticated_senders,
    messages_api,
)
from tests.agent.helpers import mail, parse
from tests.dnsserver import DnsTestServer
from tests.messages_api import MessagesAPI, Step
from tests.ops.serve_process import ServeProcess
from tests.outbound.conftest import RelaySink, fast, relay  # noqa: F401 - fixture

pytestmark = [pytest.mark.timeout(150), pytest.mark.usefixtures("authenticated_senders")]

DOMAIN = "agents.test"
SUPPORT = f"support@acme.{DOMAIN}"
SALES = f"sales@acme.{DOMAIN}"
CUSTOM = "mail.acme.example"
# A client address of its own for the edge-rate part: 127.0.0.1 is exempt by default.
COUNTED_CLIENT = "127.0.0.9"


class Node(ServeProcess):
    """One `serve` on its own loopback address, in its own work directory."""

    def __init__(self, workdir: Path, host: str, name: str, database_url: str,
                 nameserver: str, **settings: Any) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self._port: int | None = None
        self._http_port: int | None = None
        super().__init__(workdir, database_url, nameserver,
                         **{"smtp.host": host, "http.host": host, "server.hostname": name,
                            **settings})

    @property
    def port(self) -> int:
        """The SMTP port from `server.ready`, read once (the log only grows)."""
        if self._port is None:
            self._port = self.ready()["smtp_port"]
        return self._port

    @property
    def http_port(self) -> int:
        if self._http_port is None:
            self._http_port = self.ready()["http_port"]
        return self._http_port

    def send(self, sender: str, message_id: str, rcpt: str = SUPPORT,
             source: str | None = None, subject: str = "Where is my order?") -> None:
        """One message over a new connection; raises on anything but 250."""
        raw = mail(sender=sender, message_id=message_id, to=rcpt, subject=subject)
        with smtplib.SMTP(self.host, self.port, timeout=15, local_hostname="mail.sender.test",
                          source_address=(source, 0) if source else None) as client:
            client.sendmail(sender, [rcpt], raw)

    def rcpt(self, rcpt: str) -> int:
        """The reply code to RCPT TO:<rcpt> (after a MAIL from a loopback sender)."""
        with smtplib.SMTP(self.host, self.port, timeout=15,
                          local_hostname="mail.sender.test") as client:
            client.ehlo()
            client.mail("alice@example.org")
            code, _ = client.rcpt(rcpt)
            return code

    def scrape(self) -> dict[str, float]:
        """/metrics as {"name{labels}": value}."""
        url = f"http://{self.host}:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def api(self, method: str, path: str, key: str, body: dict[str, Any]) -> int:
        request = urllib.request.Request(
            f"http://{self.host}:{self.http_port}{path}", method=method,
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)

    async def command(self, *argv: str, attempts: int = 1) -> str:
        """`smtpd-agent ARGV --config <this node's file>`, as an operator on this host runs it:
        the command's own handler, run here (no interpreter start-up); its output. `attempts`: as an operator retries `domain check`
        after "DNS errors, try again later"."""
        args = build_parser().parse_args([*argv, "--config", str(self.config)])
        for _ in range(attempts):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), capture_logs():
                code = await with_database(settings_from(args), args.handler, args)
            if code == 0:
                return out.getvalue()
        raise AssertionError((argv, out.getvalue()))


@pytest.fixture
def two_nodes(database_url: str, tmp_path: Path, dns_server: DnsTestServer,
              messages_api: MessagesAPI,  # noqa: F811
              relay: tuple[RelaySink, str]) -> Iterator[Callable[..., tuple[Node, Node]]]:  # noqa: F811
    """Start node A (127.0.0.2) and node B (127.0.0.3) at once on one fresh database; they
    share only the database and the DKIM key secret file (domains.key_file)."""
    started: list[Node] = []

    def start(**settings: Any) -> tuple[Node, Node]:
        _, relay_url = relay
        common = {
            **agent_overrides(messages_api, **{"agent.lease": 4.0, "agent.timeout": 3.0}),
            **fast(relay_url, **{"outbound.lease": 4.0, "outbound.timeout": 12.0}),
            "database.pool_max": 6, "domains.key_file": str(tmp_path / "dkim.secret"),
            "dns.timeout": 3.0,
            # Long: a change seen at once on the other node came through the change feed.
            "routing.cache_ttl": 300.0, **settings}
        a = Node(tmp_path / "a", "127.0.0.2", "mx1.test.local", database_url,
                 dns_server.nameserver, **common)
        started.append(a)
        b = Node(tmp_path / "b", "127.0.0.3", "mx2.test.local", database_url,
                 dns_server.nameserver, **common)
        started.append(b)
        for node in (a, b):  # both migrate the empty database at once
            # Generous: importing the Anthropic SDK alone takes seconds of CPU, twice at once.
            node.wait_for_state("READY=1", timeout=120)
        return a, b

    yield start
    for node in started:
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGCONT)
        node.close()


def replies_by_question(sink: RelaySink) -> Counter[str]:
    """How many replies reached the relay for each inbound Message-ID (by In-Reply-To)."""
    return Counter(str(parse(r.data)["In-Reply-To"]) for r in sink.received)


async def inbound_ids(db: asyncpg.Connection) -> set[str]:
    rows = await db.fetch("SELECT message_id FROM messages WHERE direction = 'inbound'")
    return {row["message_id"] for row in rows}


async def queues_idle(db: asyncpg.Connection) -> bool:
    busy = await db.fetchval(
        """SELECT (SELECT count(*) FROM agent_jobs WHERE status IN ('pending', 'running'))
                + (SELECT count(*) FROM deliveries WHERE status <> 'sent')""")
    return busy == 0


async def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def wait_answered_once(db: asyncpg.Connection, sink: RelaySink,
                             timeout: float = 30.0) -> set[str]:
    """Every stored inbound message answered, then a moment for any second answer to show."""
    async def all_answered() -> bool:
        stored = await inbound_ids(db)
        return bool(stored) and stored <= set(replies_by_question(sink))
    await wait_until(all_answered, "every stored message answered", timeout)
    await asyncio.sleep(1.0)
    stored = await inbound_ids(db)
    counts = replies_by_question(sink)
    assert set(counts) == stored, (set(counts) ^ stored)
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n > 1}
    return stored


async def test_each_message_answered_once_and_a_killed_node_loses_nothing(
        two_nodes: Callable[..., tuple[Node, Node]], db: asyncpg.Connection,
        messages_api: MessagesAPI, relay: tuple[RelaySink, str]) -> None:  # noqa: F811
    sink, _ = relay
    a, b = two_nodes()
    await add_acme(db)

    # Mail to both nodes, each from its own correspondent: one reply each, whoever's
    # workers took the job and the delivery.
    for index in range(8):
        (a if index % 2 == 0 else b).send(f"c{index}@example.org", f"<first-{index}@example.org>")
    first = await wait_answered_once(db, sink)
    assert len(first) == 8

    await wait_until(lambda: queues_idle(db), "both queues drained")

    # B is paused (SIGSTOP) while A takes work, so every lease held at the kill is A's.
    b.signal(signal.SIGSTOP)
    sink.rcpt_delay = 8.0  # A's deliveries stay in flight at the relay ...
    for index in range(2):
        a.send(f"d{index}@example.org", f"<delivery-{index}@example.org>")

    async def a_sending() -> int:
        return int(await db.fetchval("SELECT count(*) FROM deliveries WHERE status = 'sending'"))
    await wait_until(a_sending, "A leased a delivery", timeout=15)
    messages_api.default = Step(kind="slow", delay=2.5)  # ... and its API calls

    accepted: list[str] = []
    refused: list[BaseException] = []

    def load() -> None:
        """Messages to A until it dies: every 250 is written down."""
        for index in range(500):
            message_id = f"<load-{index}@example.org>"
            try:
                a.send(f"l{index}@example.org", message_id)
            except (smtplib.SMTPException, OSError) as error:
                refused.append(error)
                return
            accepted.append(message_id)

    loader = threading.Thread(target=load)
    loader.start()

    async def a_working() -> bool:
        running = await db.fetchval("SELECT count(*) FROM agent_jobs WHERE status = 'running'")
        return running > 0 and len(accepted) >= 1
    await wait_until(a_working, "A leased an agent job", timeout=15)
    a.process.kill()  # SIGKILL: no drain, no cleanup, leases left behind
    a.process.wait(10)
    # With B paused, every lease still held is one the dead A left behind.
    jobs = await db.fetch("SELECT id FROM agent_jobs WHERE status = 'running'")
    deliveries = await db.fetch("SELECT id FROM deliveries WHERE status = 'sending'")
    assert jobs and deliveries, (jobs, deliveries)
    await asyncio.to_thread(loader.join, 30)
    assert refused, "the load to A should have failed once A was killed"

    messages_api.default = Step()
    sink.rcpt_delay = 0.0
    b.signal(signal.SIGCONT)
    for index in range(2):
        b.send(f"e{index}@example.org", f"<after-{index}@example.org>")

    # No 250 without a row: every message A accepted is stored.
    stored = await inbound_ids(db)
    assert set(accepted) <= stored, set(accepted) - stored
    # B finishes what A held (after the leases ran out) and the rest: once each.
    answered = await wait_answered_once(db, sink, timeout=45)
    assert answered >= set(accepted) | {f"<after-{i}@example.org>" for i in range(2)}
    taken_over = await db.fetch(
        "SELECT status, attempts FROM agent_jobs WHERE id = ANY($1::bigint[])",
        [row["id"] for row in jobs])
    assert all(row["status"] == "done" and row["attempts"] >= 2
                              for row in taken_over), taken_over
    resent = await db.fetch("SELECT status, attempts FROM deliveries WHERE id = ANY($1::bigint[])",
                            [row["id"] for row in deliveries])
    assert all(row["status"] == "sent" and row["attempts"] >= 2
                          for row in resent), resent
    assert b.process.poll() is None, b.log()


async def test_routing_limits_and_metrics_across_nodes(
        two_nodes: Callable[..., tuple[Node, Node]], db: asyncpg.Connection,
        dns_server: DnsTestServer, relay: tuple[RelaySink, str]) -> None:  # noqa: F811
    sink, _ = relay
    a, b = two_nodes(**{"agent.correspondent_replies_per_hour": 2,
                        "edge.rate_window": 300.0, "edge.message_rate": 3})
    await add_acme(db)
    sent = {"a": 0, "b": 0}

    # Rate limits in Postgres hold across nodes: 2 replies an hour to one correspondent,
    # four questions from her, two through each node: two answers in all, not four.
    for index, node in enumerate((a, b, a, b)):
        node.send("dana@example.org", f"<dana-{index}@example.org>", subject=f"question {index}")
        sent["a" if node is a else "b"] += 1

    async def settled() -> list[asyncpg.Record]:
        rows = await db.fetch("SELECT status, skip_reason FROM agent_jobs")
        return rows if len(rows) == 4 and all(r["status"] in ("done", "skipped")
                                              for r in rows) else []
    jobs = await wait_until(settled, "the four jobs settled")
    assert sorted(r["status"] for r in jobs) == ["done", "done", "skipped", "skipped"], jobs
    assert all(r["skip_reason"].startswith("rate limit") for r in jobs if r["status"] == "skipped")
    await asyncio.to_thread(sink.wait_for, 2)
    await asyncio.sleep(0.5)
    assert len(sink.received) == 2

    # The routing cache: both nodes found sales@ (and keep it for 300 s); disabled through
    # B's API, A refuses it at once; enabled again with the CLI on A, B accepts it at once.
    assert a.rcpt(SALES) == 250 and b.rcpt(SALES) == 250
    key = (await create_key(db, "acme", "ops", frozenset({Scope.ADMIN}))).key
    assert b.api("PATCH", "/api/v1/workspaces/acme/agents/sales", key, {"enabled": False}) == 200
    assert await wait_code(a, SALES, 550)
    assert b.rcpt(SALES) == 550
    await a.command("agent", "enable", SALES)
    assert await wait_code(b, SALES, 250)
    # An agent created through A's API receives on B.
    assert a.api("POST", "/api/v1/workspaces/acme/agents", key, {"handle": "billing"}) == 201
    assert b.rcpt(f"billing@acme.{DOMAIN}") == 250

    # A custom domain: added with the CLI on A (its DKIM keys sealed with the shared secret),
    # verified with the CLI on B, receives on A and answers signed by its own keys; removed
    # on B, A refuses it at once though it had it cached.
    publish(dns_server, json.loads(await a.command("dns-records", "--json")))
    dns_server.a(f"mx1.{DOMAIN}", "192.0.2.1")
    dns_server.a(f"mx2.{DOMAIN}", "192.0.2.2")
    publish(dns_server, json.loads(await a.command("domain", "add", CUSTOM,
                                                   "--workspace", "acme", "--json")))
    assert a.rcpt(f"support@{CUSTOM}") == 550
    await b.command("domain", "check", CUSTOM, attempts=3)
    assert await wait_code(a, f"support@{CUSTOM}", 250)
    a.send("erin@example.org", "<custom-1@example.org>", rcpt=f"support@{CUSTOM}")
    sent["a"] += 1
    [reply] = [r for r in await asyncio.to_thread(sink.wait_for, 3)
               if parse(r.data)["In-Reply-To"] == "<custom-1@example.org>"]
    assert {s.split("d=")[1].split(";")[0] for s in parse(reply.data).get_all("DKIM-Signature")} \
        == {CUSTOM}
    await b.command("domain", "remove", CUSTOM)
    assert await wait_code(a, f"support@{CUSTOM}", 550)

    # Per-client edge rates are per node (documented): 3 messages per window from one
    # client; the fourth to A is refused and the client banned there, B still takes it.
    for index in range(3):
        a.send("frank@example.org", f"<frank-{index}@example.org>", source=COUNTED_CLIENT)
        sent["a"] += 1
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        a.send("frank@example.org", "<frank-3@example.org>", source=COUNTED_CLIENT)
    assert refused.value.smtp_code == 421
    b.send("frank@example.org", "<frank-3@example.org>", source=COUNTED_CLIENT)
    sent["b"] += 1

    # /metrics: each node counts what it accepted; the queue gauges are the shared tables'.
    await wait_until(lambda: queues_idle(db), "both queues settled")
    scraped = {"a": a.scrape(), "b": b.scrape()}
    for name, samples in scraped.items():
        assert samples['smtpd_agent_messages_accepted_total{transport="smtp"}'] == sent[name]
    queues = [{k: v for k, v in samples.items() if k.startswith("smtpd_agent_queue_depth{")}
              for samples in scraped.values()]
    assert queues[0] and queues[0] == queues[1]
    assert scraped["a"]['smtpd_agent_edge_rate_exceeded_total{kind="message"}'] == 1
    assert scraped["b"].get('smtpd_agent_edge_rate_exceeded_total{kind="message"}', 0) == 0
    # One deployment, two hosts on record (`deployment show`).
    hosts = {row["hostname"] for row in await db.fetch("SELECT hostname FROM deployment_hosts")}
    assert hosts == {"mx1.test.local", "mx2.test.local"}


async def wait_code(node: Node, rcpt: str, code: int, timeout: float = 3.0) -> bool:
    """True once RCPT TO:<rcpt> at `node` answers `code`; well inside the 300 s cache TTL."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(node.rcpt, rcpt) == code:
            return True
        await asyncio.sleep(0.1)
    return False


def publish(dns: DnsTestServer, record_set: dict[str, Any]) -> None:
    for record in record_set["records"]:
        value = (record["priority"], record["value"]) if record["type"] == "MX" else record["value"]
        dns.add(record["name"], record["type"], value)
