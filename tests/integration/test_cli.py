"""The `smtpd-agent` command as a user runs it: serve with the embedded Postgres, and the
management commands attaching to that same running Postgres."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiosmtplib
import pytest

from tests.support import wait_for_ready

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "agents.test"


@pytest.fixture(scope="module")
def running(tmp_path_factory, dns_server_session):
    """`smtpd-agent serve` in a subprocess, its own embedded Postgres in a state dir."""
    state = tmp_path_factory.mktemp("cli-state")
    env = {**os.environ, "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": DOMAIN,
           "SMTPD_AGENT_ROUTING_CACHE_TTL": "0.2", "SMTPD_AGENT_LOG_FORMAT": "json",
           "SMTPD_AGENT_DNS_NAMESERVERS": dns_server_session.nameserver,
           "SMTPD_AGENT_DNS_TIMEOUT": "0.5"}
    env.pop("DATABASE_URL", None)
    log = open(state / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "smtpd_agent", "serve", "--state-dir", str(state),
         "--port", "0", "--http-port", "0"], cwd=REPO, env=env, stdout=log,
        stderr=subprocess.STDOUT)
    try:
        port = wait_for_ready(process, state / "serve.log")["smtp_port"]
    except RuntimeError as error:
        process.kill()
        process.wait(30)
        pytest.fail(str(error))

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "smtpd_agent", *args,
                                 "--state-dir", str(state)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    yield port, cli, state
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    log.close()


def test_every_command_has_help():
    for command in (["serve"], ["migrate"], ["workspace", "add"], ["workspace", "list"],
                    ["agent", "add"], ["agent", "list"], ["agent", "disable"], ["inbox"],
                    ["apikey", "create"], ["apikey", "list"], ["apikey", "revoke"],
                    ["drafts", "list"], ["drafts", "send"], ["drafts", "discard"]):
        result = subprocess.run([sys.executable, "-m", "smtpd_agent", *command, "--help"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage: smtpd-agent" in result.stdout, command


def test_manage_deliver_and_read_the_inbox_while_serve_runs(running):
    port, cli, state = running
    assert "acme created" in cli("workspace", "add", "acme", "--name", "Acme Inc").stdout
    duplicate = cli("workspace", "add", "acme", check=False)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    cli("agent", "add", f"support@acme.{DOMAIN}", "--name", "Acme Support",
        "--prompt", "Be brief.")
    cli("agent", "add", f"quiet@acme.{DOMAIN}", "--no-auto-reply")
    bad = cli("agent", "add", "support@acme.example.com", check=False)
    assert bad.returncode == 1 and DOMAIN in bad.stderr

    workspaces = json.loads(cli("workspace", "list", "--json").stdout)
    assert [(w["slug"], w["name"], w["domain"]) for w in workspaces] == [
        ("acme", "Acme Inc", f"acme.{DOMAIN}")]
    agents = json.loads(cli("agent", "list", "--workspace", "acme", "--json").stdout)
    assert {a["address"]: a["auto_reply"] for a in agents} == {
        f"quiet@acme.{DOMAIN}": False, f"support@acme.{DOMAIN}": True}
    assert next(a for a in agents if a["handle"] == "support")["system_prompt"] == "Be brief."

    import asyncio
    asyncio.run(aiosmtplib.send(
        b"From: carol@example.org\r\nSubject: CLI check\r\nMessage-ID: <cli@example.org>\r\n"
        b"\r\nhello\r\n", sender="carol@example.org", recipients=[f"support@acme.{DOMAIN}"],
        hostname="127.0.0.1", port=port))
    threads = json.loads(cli("inbox", f"support@acme.{DOMAIN}", "--json").stdout)
    assert len(threads) == 1 and threads[0]["subject"] == "CLI check"
    [message] = threads[0]["messages"]
    assert message["from_header"] == "carol@example.org" and message["size"] > 0
    text = cli("inbox", f"support@acme.{DOMAIN}").stdout
    assert "CLI check" in text and "carol@example.org" in text
    # still one embedded postmaster: the CLI attached to serve's
    assert len(list(state.glob("pgdata/postmaster.pid"))) == 1


def test_disabled_agent_is_refused_after_the_cache_ttl(running):
    port, cli, _ = running
    cli("workspace", "add", "beta")
    cli("agent", "add", f"help@beta.{DOMAIN}")
    cli("agent", "disable", f"help@beta.{DOMAIN}")
    time.sleep(0.3)

    async def rcpt() -> int:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        await smtp.connect()
        await smtp.ehlo()
        await smtp.mail("x@example.org")
        try:
            response = await smtp.rcpt(f"help@beta.{DOMAIN}")
            return response.code
        except aiosmtplib.SMTPRecipientRefused as refused:
            return refused.code
        finally:
            await smtp.quit()

    import asyncio
    assert asyncio.run(rcpt()) == 550
    listed = json.loads(cli("agent", "list", "--json").stdout)
    assert next(a for a in listed if a["handle"] == "help")["enabled"] is False


def test_migrate_twice_is_a_no_op(running):
    _, cli, _ = running
    assert "up to date" in cli("migrate").stdout


def test_serve_answers_health_over_http(running):
    _port, _cli, state = running
    events = [json.loads(line) for line in (state / "serve.log").read_text().splitlines()
              if line.startswith("{")]
    [listening] = [e for e in events if e.get("event") == "http.listening"]
    with urllib.request.urlopen(f"http://127.0.0.1:{listening['port']}/health/ready",
                                timeout=10) as response:
        body = json.loads(response.read())
    assert response.status == 200 and body["ready"] is True


def test_reserved_workspace_slugs_are_refused(running):
    _, cli, _ = running
    for slug in ("bounce", "mail", "mta-sts"):
        result = cli("workspace", "add", slug, check=False)
        assert result.returncode == 1 and "reserved" in result.stderr, slug
