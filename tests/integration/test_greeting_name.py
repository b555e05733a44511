"""The name the server announces (issue 21): server.hostname in the 220 greeting, the EHLO and
HELO replies and our Received header; a warning when it is a name like localhost, and no
start on port 25 with such a name unless server.allow_local_hostname is set."""

from __future__ import annotations

import asyncio
import socket

import pytest
from structlog.testing import capture_logs

from smtpd_agent.app import check_greeting_name
from smtpd_agent.config import ConfigError, load_settings, local_name_problem
from smtpd_agent.store import directory
from tests.support import Dialogue, make_settings


async def test_greeting_ehlo_helo_and_received_use_the_configured_name(start_server, db):
    server = start_server(**{"server.hostname": "mx1.mail-host.example"})
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support", auto_reply=False)

    def dialogue() -> tuple[list[bytes], ...]:
        first = Dialogue.open(server.port)
        _, greeting = first.reply()
        first.send(b"EHLO client.example.org\r\n")
        _, ehlo = first.reply()
        assert first.command("MAIL FROM:<alice@example.org>")[0] == 250
        assert first.command("RCPT TO:<support@acme.agents.test>")[0] == 250
        assert first.command("DATA")[0] == 354
        code, _ = first.command("Subject: hi\r\nMessage-ID: <g1@example.org>\r\n\r\nhello\r\n.")
        assert code == 250
        second = Dialogue.open(server.port)
        second.reply()
        second.send(b"HELO client.example.org\r\n")
        _, helo = second.reply()
        return greeting, ehlo, helo

    greeting, ehlo, helo = await asyncio.to_thread(dialogue)
    assert greeting[0].startswith(b"220 mx1.mail-host.example ")
    assert ehlo[0] == b"250-mx1.mail-host.example"
    assert helo[0] == b"250 mx1.mail-host.example"
    raw = await db.fetchval("SELECT messages.raw FROM messages")
    assert b"\tby mx1.mail-host.example (smtpd-agent) with ESMTP id " in raw


async def test_a_localhost_name_is_logged_at_start(start_server):
    with capture_logs() as logs:
        start_server(**{"server.hostname": "localhost"})
    [warning] = [e for e in logs if e["event"] == "server.hostname_not_public"]
    assert warning["log_level"] == "warning" and warning["hostname"] == "localhost"
    assert "server.hostname" in warning["hint"]


def test_the_fallback_is_this_machines_name_and_warns_when_it_is_local(tmp_path):
    """Without server.hostname the name is socket.getfqdn() (here `localhost`, as on the
    machine in the issue); the start-up check warns exactly when that name is local."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    settings = load_settings(path=empty, env={})
    fqdn = socket.getfqdn()
    assert settings.server.hostname == fqdn
    with capture_logs() as logs:
        check_greeting_name(settings)
    warned = [e for e in logs if e["event"] == "server.hostname_not_public"]
    if local_name_problem(fqdn):
        assert warned and warned[0]["fallback"] is True and warned[0]["hostname"] == fqdn
    else:
        assert not warned


def test_port_25_with_a_local_name_refuses_unless_allowed(tmp_path):
    local = make_settings("postgresql://unused", tmp_path, **{
        "server.hostname": "localhost", "smtp.port": 25})
    with pytest.raises(ConfigError, match="server.allow_local_hostname"):
        check_greeting_name(local)
    check_greeting_name(local.replace({"server.allow_local_hostname": True}))  # told to
    check_greeting_name(local.replace({"server.hostname": "mx1.mail-host.example"}))
    check_greeting_name(local.replace({"smtp.port": 2525}))  # warns only


@pytest.mark.parametrize("name, local", [
    ("localhost", True), ("LOCALHOST.", True), ("localhost.localdomain", True),
    ("vm", True), ("box.local", True), ("127.0.0.1", True), ("[::1]", True), ("", True),
    ("mx1.aexy.email", False), ("mail.example.co.uk.", False),
])
def test_local_names(name, local):
    assert (local_name_problem(name) is not None) == local
