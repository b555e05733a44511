"""Dockerfile and docker-compose.yml cannot be run here (no Docker daemon); check what can
be checked without one: the image's shape, and that every setting they pass exists."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from smtpd_agent.config import STANDARD_ENV, env_name, known_keys

REPO = Path(__file__).resolve().parents[2]


def setting_names() -> set[str]:
    return {env_name(key) for key in known_keys()} | set(STANDARD_ENV)


def test_dockerfile_is_multi_stage_non_root_with_a_health_check():
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) == 2 and all("slim" in image for image in stages)
    assert re.search(r"^USER smtpd-agent$", text, re.MULTILINE)
    assert re.search(r"^EXPOSE 25 8001$", text, re.MULTILINE)
    assert "HEALTHCHECK" in text and "/health" in text
    # exactly the runtime lock, checked by hash, then the project without resolving again
    assert "--require-hashes --no-deps -r requirements/runtime.lock" in text
    assert "pip install --no-deps ." in text and "test.lock" not in text
    for name in re.findall(r"\b(SMTPD_AGENT_[A-Z_]+)=", text):
        if name != "SMTPD_AGENT_CONFIG":
            assert name in setting_names(), name


def test_compose_has_postgres_clamd_and_passes_known_settings():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "clamd", "smtpd-agent"} <= set(services)
    env = services["smtpd-agent"]["environment"]
    assert env["SMTPD_AGENT_SCAN_CLAMD"].startswith("tcp:clamd:")
    assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:" in env["DATABASE_URL"]
    for name in env:
        assert name in setting_names() | {"ANTHROPIC_API_KEY"}, name
    assert services["smtpd-agent"]["stop_grace_period"] == "45s"


def healthcheck_command() -> list[str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.MULTILINE)
    assert match, "no HEALTHCHECK CMD in exec form"
    return json.loads(match.group(1))


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False), (None, False)])
def test_healthcheck_command_follows_the_health_status(status, healthy):
    """Run the image's HEALTHCHECK command (with this Python) against a loopback /health."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    port = server.server_address[1]
    if status is None:
        server.server_close()  # nothing listens: connection refused
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    command = healthcheck_command()
    assert command[0] == "python"
    try:
        result = subprocess.run([sys.executable, *command[1:]], capture_output=True,
                                timeout=30, check=False,
                                env={**os.environ, "SMTPD_AGENT_HTTP_PORT": str(port)})
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    assert (result.returncode == 0) is healthy, result.stderr


def test_healthcheck_command_against_a_running_serve(serve_process):
    """The same command against the real HTTP service of `smtpd-agent serve`."""
    server = serve_process()
    result = subprocess.run([sys.executable, *healthcheck_command()[1:]], capture_output=True,
                            timeout=30, check=False,
                            env={**os.environ, "SMTPD_AGENT_HTTP_PORT": str(server.http_port)})
    assert result.returncode == 0, result.stderr
