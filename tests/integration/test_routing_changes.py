"""Routing changes reach a running server at once, over real SMTP: the server caches routes
for an hour here (`routing.cache_ttl` 3600), so only the push (LISTEN/NOTIFY) and the rule
that a refusal is never served from the cache can make these pass.

The change feed itself (store/changes.py) is tested against a Postgres that drops its
connection: what changed meanwhile is not lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from smtpd_agent.store import directory
from smtpd_agent.store.changes import ROUTING_CHANNEL, ChangeFeed
from tests.dnsserver import DnsTestServer
from tests.integration.test_domains import (
    CUSTOM,
    Cli,
    add_and_publish,
    publish_default,
    settings_for,
)
from tests.support import DEFAULT_DOMAIN, Dialogue, ServerThread, enhanced

HOUR = {"routing.cache_ttl": 3600}


def message(tag: str, rcpt: str) -> bytes:
    return (f"From: alice@example.org\r\nTo: {rcpt}\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@example.org>\r\n\r\nhello\r\n").encode()


def session(port: int) -> Dialogue:
    dialogue = Dialogue.open(port)
    dialogue.reply()
    dialogue.command("EHLO client.example.org")
    assert dialogue.command("MAIL FROM:<alice@example.org>")[0] == 250
    return dialogue


async def rcpt(dialogue: Dialogue, address: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(dialogue.command, f"RCPT TO:<{address}>")


async def first_refusal(dialogue: Dialogue, address: str, within: float) -> float:
    """Seconds until RCPT to `address` is refused (NOTIFY arrives on its own connection,
    so it may trail the COMMIT by a moment); fails if it is still accepted after `within`."""
    started = time.monotonic()
    while True:
        code, line = await rcpt(dialogue, address)
        if code != 250:
            assert code == 550 and enhanced(line) == "5.1.1", line
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"{address} still accepted"
        await asyncio.sleep(0.02)


async def test_a_domain_verified_while_the_server_runs_receives_at_once(
        start_server: Callable[..., ServerThread], db: asyncpg.Connection, database_url: str,
        tmp_path: Path, dns_server: DnsTestServer, capsys: pytest.CaptureFixture[str]) -> None:
    server = start_server(**HOUR)
    await directory.add_workspace(db, "acme", "Acme Inc")
    await directory.add_agent(db, "acme", "support")
    cli = Cli(settings_for(database_url, tmp_path / "cli", dns_server), capsys)
    await publish_default(dns_server, cli)
    await add_and_publish(dns_server, cli, CUSTOM, "acme")

    dialogue = session(server.port)
    code, line = await rcpt(dialogue, f"support@{CUSTOM}")
    assert code == 550 and enhanced(line) == "5.7.1", line  # pending: relay denied
    assert (await cli("domain", "check", CUSTOM))[0] == 0
    # the very next RCPT, in the same session: a refusal is never answered from the cache
    code, line = await rcpt(dialogue, f"support@{CUSTOM}")
    assert code == 250, line
    assert (await asyncio.to_thread(dialogue.command, "DATA"))[0] == 354
    await asyncio.to_thread(dialogue.send, message("verified", f"support@{CUSTOM}") + b".\r\n")
    code, lines = await asyncio.to_thread(dialogue.reply)
    assert code == 250, lines
    assert await db.fetchval("SELECT count(*) FROM messages WHERE subject = 'verified'") == 1


async def test_agent_changes_reach_the_next_rcpt(
        start_server: Callable[..., ServerThread], db: asyncpg.Connection) -> None:
    server = start_server(**HOUR)
    await directory.add_workspace(db, "acme", "Acme Inc")
    await directory.add_agent(db, "acme", "support")
    address = f"support@acme.{DEFAULT_DOMAIN}"
    dialogue = session(server.port)
    assert (await rcpt(dialogue, address))[0] == 250  # cached for an hour from here

    await directory.set_agent_enabled(db, "acme", "support", False)
    assert await first_refusal(dialogue, address, within=2.0) < 2.0

    await directory.set_agent_enabled(db, "acme", "support", True)
    assert (await rcpt(dialogue, address))[0] == 250  # a miss was never cached

    code, line = await rcpt(dialogue, f"help@acme.{DEFAULT_DOMAIN}")
    assert code == 550 and enhanced(line) == "5.1.1", line
    await directory.add_agent(db, "acme", "help")
    assert (await rcpt(dialogue, f"help@acme.{DEFAULT_DOMAIN}"))[0] == 250

    await db.execute("DELETE FROM workspaces WHERE slug = 'acme'")
    assert await first_refusal(dialogue, address, within=2.0) < 2.0
    dialogue.close()


async def test_changes_missed_while_the_feed_was_disconnected_are_not_lost(
        database_url: str, db: asyncpg.Connection) -> None:
    """Postgres drops the LISTEN connection; a change committed before it is back arrives as
    a reset (every cache expired) once the feed has reconnected by itself."""
    from smtpd_agent.store.database import migrate
    await migrate(db)
    seen: list[str] = []
    feed = ChangeFeed(database_url, connect_timeout=5, retry_delay=0.2)
    feed.subscribe(ROUTING_CHANNEL, seen.append, lambda: seen.append("reset"))
    try:
        await feed.start()
        assert feed.connected and seen == ["reset"]
        await directory.add_workspace(db, "acme")
        await wait_for(lambda: "workspaces" in seen)

        seen.clear()
        await db.execute("""SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                            WHERE pid <> pg_backend_pid() AND query LIKE 'LISTEN%'""")
        await wait_for(lambda: not feed.connected)
        await directory.add_agent(db, "acme", "support")  # nobody listening
        await wait_for(lambda: feed.connected and "reset" in seen)
        assert "agents" not in seen  # missed, and made up for by the reset
        await directory.set_agent_enabled(db, "acme", "support", False)
        await wait_for(lambda: "agents" in seen)
    finally:
        await feed.close()
    assert not feed.connected


async def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never met"
        await asyncio.sleep(0.02)


async def test_a_refusal_never_rests_on_a_cached_domain(database_url: str,
                                                        db: asyncpg.Connection) -> None:
    """Without the push (a router with no feed, as while the LISTEN connection is down), a
    domain that moved to another workspace is still cached as the old one's: mail its old
    workspace has no mailbox for is routed afresh, not refused from that entry."""
    from smtpd_agent.routing import RouteKind, Router
    from smtpd_agent.store.database import migrate
    await migrate(db)
    for slug in ("acme", "globex"):
        await directory.add_workspace(db, slug)
    await directory.add_agent(db, "acme", "support")
    await directory.add_agent(db, "globex", "billing")
    verified = """INSERT INTO domains (workspace_id, name, ownership_token, mail_from, state,
                                      verified_at)
                  SELECT id, $2, 't', 'mail.' || $2, 'verified', now() FROM workspaces
                  WHERE slug = $1"""
    await db.execute(verified, "acme", CUSTOM)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        router = Router(pool, DEFAULT_DOMAIN, cache_ttl=3600)
        assert (await router.route(f"support@{CUSTOM}")).mailbox.workspace_slug == "acme"
        await db.execute("DELETE FROM domains WHERE name = $1", CUSTOM)
        await db.execute(verified, "globex", CUSTOM)
        route = await router.route(f"billing@{CUSTOM}")
        assert route.kind is RouteKind.MAILBOX and route.mailbox.workspace_slug == "globex"
    finally:
        await pool.close()


async def test_the_routing_trigger_function_is_applied_again_with_its_triggers(
        database_url: str, db: asyncpg.Connection) -> None:
    """A changed trigger function (a repeatable file) is dropped with its triggers and its
    file creates both again: the push keeps working after an upgrade."""
    from smtpd_agent.store.database import migrate
    await migrate(db)
    triggers = """SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                   WHERE p.proname = 'notify_routing_change'"""
    assert await db.fetchval(triggers) == 4
    await db.execute("""UPDATE schema_repeatables SET sha256 = 'old'
                         WHERE name = 'function:notify_routing_change'""")
    await migrate(db)
    assert await db.fetchval(triggers) == 4
    seen: list[str] = []
    feed = ChangeFeed(database_url, connect_timeout=5)
    feed.subscribe(ROUTING_CHANNEL, seen.append, lambda: None)
    try:
        await feed.start()
        await directory.add_workspace(db, "acme")
        await wait_for(lambda: seen == ["workspaces"])
    finally:
        await feed.close()
