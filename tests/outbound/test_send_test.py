"""`smtpd-agent send-test` through the relay sink, and `outbound-worker` as a command."""

from __future__ import annotations

import asyncio
import json

import pytest
from structlog.testing import capture_logs

from smtpd_agent.cli import build_parser, with_database
from smtpd_agent.store import directory
from smtpd_agent.store.directory import DirectoryError
from tests.support import DEFAULT_DOMAIN, make_settings


# Every wait in here is bounded; a hang fails this test, not the run.
pytestmark = pytest.mark.timeout(60)


async def run(settings, *argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    with capture_logs():
        return await with_database(settings, args.handler, args)


async def test_send_test_sends_a_signed_message_through_the_relay(
        database_url, db, relay, tmp_path, capsys):
    sink, url = relay
    settings = make_settings(database_url, tmp_path / "cli", **{"outbound.relay": url})
    await run(settings, "migrate")
    await directory.add_workspace(db, "acme")
    capsys.readouterr()
    code = await run(settings, "send-test", "--from", f"support@acme.{DEFAULT_DOMAIN}",
                     "--to", "someone@example.test", "--json")
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert (report["outcome"], report["code"], report["transport"]) == ("sent", 250, "smtp")
    assert report["mail_from"].endswith(f"@bounce.{DEFAULT_DOMAIN}")
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    assert received.rcpt_tos == ["someone@example.test"]
    assert received.data.count(b"DKIM-Signature:") == 2
    assert b"-----BEGIN" not in capsys.readouterr().out.encode()  # no key material printed


async def test_send_test_without_a_transport_says_so(database_url, db, tmp_path):
    settings = make_settings(database_url, tmp_path / "cli")
    await run(settings, "migrate")
    await directory.add_workspace(db, "acme")
    with pytest.raises(DirectoryError, match="outbound.relay"):
        await run(settings, "send-test", "--from", f"support@acme.{DEFAULT_DOMAIN}",
                  "--to", "someone@example.test")


def test_outbound_worker_commands_are_registered():
    args = build_parser().parse_args(["outbound-worker", "--state-dir", "/tmp/x"])
    assert callable(args.run)
    args = build_parser().parse_args(["worker", "--with-outbound"])
    assert args.with_outbound and callable(args.run)


async def test_outbound_worker_process_delivers_and_stops_on_sigterm(
        database_url, db, relay, dns_server, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.support import REPO

    from .conftest import make_agent, store_reply, wait_state

    sink, url = relay
    env = {**os.environ, "DATABASE_URL": database_url,
           "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": DEFAULT_DOMAIN,
           "SMTPD_AGENT_DNS_NAMESERVERS": dns_server.nameserver,
           "SMTPD_AGENT_OUTBOUND_RELAY": url, "SMTPD_AGENT_OUTBOUND_POLL_INTERVAL": "0.05",
           "SMTPD_AGENT_LOG_FORMAT": "json"}
    await run(make_settings(database_url, tmp_path / "cli"), "migrate")
    agent = await make_agent(db)
    message_id = await store_reply(db, agent, "bob@example.org")
    process = subprocess.Popen(
        [sys.executable, "-m", "smtpd_agent", "outbound-worker", "--state-dir",
         str(tmp_path / "state")], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        await wait_state(db, message_id, {"sent"}, timeout=30)
        assert len(sink.received) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output[-2000:]
    assert b'"outbound.stopped"' in output
