"""`smtpd-agent serve` as systemd runs it: a subprocess with a config file, a
NOTIFY_SOCKET to report readiness on, and real signals."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support import TEST_SESSION

REPO = Path(__file__).resolve().parents[2]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, values: dict[str, Any]) -> None:
    sections: dict[str, list[str]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, []).append(f"{name} = {toml_value(value)}")
    path.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n\n"
                            for s, lines in sections.items()))


class ServeProcess:
    """A running `smtpd-agent serve`; `states()` are the sd_notify datagrams it sent."""

    def __init__(self, workdir: Path, database_url: str, nameserver: str,
                 **settings: Any) -> None:
        self.workdir = workdir
        self.config = workdir / "smtpd-agent.toml"
        self.settings = {
            "server.default_domain": "agents.test", "server.hostname": "mx.test.local",
            "server.state_dir": str(workdir / "state"), "database.url": database_url,
            "database.pool_max": 4, "smtp.host": "127.0.0.1", "smtp.port": 0,
            "http.host": "127.0.0.1", "http.port": 0,
            "dns.nameservers": [nameserver], "dns.timeout": 0.5, "auth.timeout": 3,
            "routing.cache_ttl": 0.2, "log.format": "json", "smtp.session": TEST_SESSION,
            "smtp.processes": 1, **settings}
        write_config(self.config, self.settings)
        # An abstract-namespace socket (the "@" form of NOTIFY_SOCKET): no path length limit.
        name = f"smtpd-agent-test-{secrets.token_hex(6)}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind("\0" + name)
        self.received: list[str] = []
        self.log_path = workdir / "serve.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - the child writes it until close()
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("SMTPD_AGENT_") and key != "DATABASE_URL"}
        env["NOTIFY_SOCKET"] = "@" + name
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smtpd_agent", "serve", "--config", str(self.config)],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_for_state(self, state: str, timeout: float = 60) -> str:
        """Block until a notify datagram carrying the line `state` (e.g. READY=1) arrives."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}: {self.log()}")
            self.notify.settimeout(min(0.5, max(0.01, deadline - time.monotonic())))
            try:
                datagram = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            self.received.append(datagram)
            if state in datagram.splitlines():
                return datagram
        raise AssertionError(f"no {state} within {timeout}s; got {self.received}: {self.log()}")

    @property
    def port(self) -> int:
        """The SMTP port serve bound (it was given 0), from its `server.ready` line."""
        return self.ready()["smtp_port"]

    @property
    def http_port(self) -> int:
        return self.ready()["http_port"]

    def ready(self) -> dict[str, Any]:
        """serve's `server.ready` event; logged before READY=1 is sent, so wait for that first."""
        events = self.events("server.ready")
        assert events, f"serve has not logged server.ready: {self.log()}"
        return events[0]

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log events called `name`."""
        found = []
        for line in self.log().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()
        self.notify.close()
