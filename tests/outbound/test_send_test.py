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


def test_outbound_worker_command_is_registered():
    args = build_parser().parse_args(["outbound-worker", "--state-dir", "/tmp/x"])
    assert callable(args.run)
