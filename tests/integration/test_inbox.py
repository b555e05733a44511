"""One inbox query module for the CLI and the HTTP API; `smtpd-agent inbox` shows a short
text preview of each message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from smtpd_agent.config import DatabaseSettings
from smtpd_agent.message import parse_message
from smtpd_agent.record import Envelope, InboundMessage, Mailbox, Recipient
from smtpd_agent.store import directory, inbox
from smtpd_agent.store.database import create_pool, migrate
from smtpd_agent.store.messages import Verdicts, store_inbound
from tests.support import DEFAULT_DOMAIN

REPO = Path(__file__).resolve().parents[2]

TEXT = (b"From: carol@example.org\r\nSubject: plain\r\nMessage-ID: <p@example.org>\r\n\r\n"
        b"Hello   there,\r\n\r\nthe order\tshipped today." + b" and more" * 40 + b"\r\n")
HTML = (b"From: dave@example.org\r\nSubject: html only\r\nMessage-ID: <h@example.org>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n"
        b"<html><body><p>Your <b>invoice</b></p>\r\n<p>is attached</p></body></html>\r\n")


async def test_inbox_shows_a_preview_of_each_message(database_url, tmp_path):
    pool = await create_pool(database_url, DatabaseSettings(pool_max=2))
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
        await directory.add_workspace(pool, "acme")
        await directory.add_agent(pool, "acme", "support")
        agent = await directory.get_agent(pool, "acme", "support")
        box = Mailbox(agent.workspace_id, "acme", agent.id, "support", f"acme.{DEFAULT_DOMAIN}")
        for raw in (TEXT, HTML):
            envelope = Envelope("s", "127.0.0.1", "client.test", "x@example.org",
                                (Recipient(box.address, box),))
            await store_inbound(pool, InboundMessage(envelope, raw, parse_message(raw)),
                                Verdicts(), 30, "q")

        # the query module: the CLI's view and the API's thread view give the same preview
        threads = await inbox.agent_inbox(pool, agent)
        previews = {t["subject"]: t["messages"][0]["preview"] for t in threads}
        assert previews["plain"].startswith("Hello there, the order shipped today. and more")
        assert len(previews["plain"]) == inbox.PREVIEW_CHARS
        assert previews["html only"] == "Your invoice is attached"
        api_view = await inbox.thread(pool, agent.workspace_id, threads[0]["id"])
        assert api_view["messages"][0]["preview"] == threads[0]["messages"][0]["preview"]
        # another workspace's id finds nothing
        assert await inbox.thread(pool, agent.workspace_id + 1, threads[0]["id"]) is None
    finally:
        await pool.close()

    env = {**os.environ, "DATABASE_URL": database_url,
           "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": DEFAULT_DOMAIN}
    command = [sys.executable, "-m", "smtpd_agent", "inbox", f"support@acme.{DEFAULT_DOMAIN}",
               "--state-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "preview: Your invoice is attached" in result.stdout
    assert "preview: Hello there, the order shipped today." in result.stdout
    listed = json.loads(subprocess.run(command + ["--json"], cwd=REPO, env=env,
                                       capture_output=True, text=True, timeout=120).stdout)
    assert {t["messages"][0]["preview"] for t in listed} == set(previews.values())
