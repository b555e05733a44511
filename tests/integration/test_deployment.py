"""One identity per deployment (issue 21): the default domain `serve` ran with is recorded in
the database; management commands use it, a different one stops with an error naming both,
and `deployment set-domain` changes it on purpose."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from smtpd_agent.app import App
from smtpd_agent.store.deployment import DeploymentMismatch
from tests.support import make_settings, wait_for_ready

REPO = Path(__file__).resolve().parents[2]


def command_env(database_url: str, dns_server) -> dict[str, str]:
    """The repository's config/smtpd-agent.toml (default_domain = "aexy.email") applies, as
    it does for an operator who runs the commands from the same directory."""
    env = {**os.environ, "DATABASE_URL": database_url, "SMTPD_AGENT_LOG_FORMAT": "json",
           "SMTPD_AGENT_DNS_NAMESERVERS": dns_server.nameserver,
           "SMTPD_AGENT_AGENT_WORKERS": "0"}
    env.pop("SMTPD_AGENT_SERVER_DEFAULT_DOMAIN", None)
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smtpd_agent", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def serve_with_flag(database_url, dns_server, tmp_path):
    """`smtpd-agent serve --default-domain example.test`, a real subprocess."""
    env = command_env(database_url, dns_server)
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "smtpd_agent", "serve", "--default-domain", "example.test",
             "--state-dir", str(tmp_path / "state"), "--port", "0", "--http-port", "0"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_ready(process, log_path)
    except RuntimeError as error:
        process.kill()
        process.wait(30)
        pytest.fail(str(error))
    yield env
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0


def test_commands_use_the_default_domain_serve_recorded(serve_with_flag):
    env = serve_with_flag
    added = cli(env, "workspace", "add", "acme")
    assert added.returncode == 0, added.stderr
    assert "<handle>@acme.example.test" in added.stdout
    agent = cli(env, "agent", "add", "support@acme.example.test")
    assert agent.returncode == 0, agent.stderr
    assert "support@acme.example.test" in agent.stdout
    listed = cli(env, "workspace", "list", "--json")
    assert [w["domain"] for w in json.loads(listed.stdout)] == ["acme.example.test"]
    shown = cli(env, "deployment", "show", "--json")
    identity = json.loads(shown.stdout)
    assert identity["default_domain"] == "example.test"
    assert [host for host, _ in identity["hosts"]] == [socket.getfqdn()]  # serve's greeting name


def test_a_different_default_domain_is_refused_naming_both(serve_with_flag):
    env = serve_with_flag
    refused = cli(env, "workspace", "add", "globex", "--default-domain", "other.test")
    assert refused.returncode == 1
    assert "'example.test'" in refused.stderr and "'other.test'" in refused.stderr
    assert "smtpd-agent deployment set-domain other.test" in refused.stderr
    assert "Traceback" not in refused.stderr
    listed = cli(env, "workspace", "list", "--json")
    assert json.loads(listed.stdout) == []  # nothing was created under the other domain
    migrate = cli(env, "migrate", "--default-domain", "other.test")
    assert migrate.returncode == 1 and "set-domain other.test" in migrate.stderr


async def start_app(database_url: str, dns_server, tmp_path: Path, domain: str) -> None:
    """Start (and stop) a whole server in this loop; it raises if refused."""
    app = App(make_settings(database_url, tmp_path / f"app-{domain}", **{
        "server.default_domain": domain, "dns.nameservers": [dns_server.nameserver]}))
    await app.start()  # on failure it has stopped what it started
    await app.stop()


async def test_a_server_with_another_domain_refuses_until_the_change_is_made(
        start_server, database_url, dns_server, tmp_path):
    start_server(**{"server.default_domain": "example.test"})
    with pytest.raises(DeploymentMismatch) as refused:
        await start_app(database_url, dns_server, tmp_path, "other.test")
    assert refused.value.recorded == "example.test" and refused.value.given == "other.test"
    assert "deployment set-domain other.test" in str(refused.value)

    env = command_env(database_url, dns_server)
    changed = cli(env, "deployment", "set-domain", "other.test")
    assert changed.returncode == 0, changed.stderr
    assert "was example.test" in changed.stdout
    start_server(**{"server.default_domain": "other.test"})  # now it is the deployment's
    added = cli(env, "workspace", "add", "acme")
    assert "<handle>@acme.other.test" in added.stdout
    with pytest.raises(DeploymentMismatch):
        await start_app(database_url, dns_server, tmp_path, "example.test")


def test_migrate_records_the_identity(database_url, dns_server):
    env = command_env(database_url, dns_server)
    assert cli(env, "deployment", "show").stdout.startswith("no deployment recorded yet")
    migrated = cli(env, "migrate", "--default-domain", "first.test")
    assert migrated.returncode == 0, migrated.stderr
    assert "deployment: default domain first.test" in migrated.stdout
    added = cli(env, "workspace", "add", "acme")  # the file says aexy.email: the record wins
    assert "<handle>@acme.first.test" in added.stdout
