"""The sd_notify client on its own: the datagram format, both address forms, no socket."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from smtpd_agent.systemd import Notifier


@pytest.fixture
def listener(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = Path("/tmp") / f"sdn-{tmp_path.name[-20:]}.sock"
    sock.bind(str(path))
    sock.settimeout(5)
    yield str(path), sock
    sock.close()
    path.unlink(missing_ok=True)


def test_ready_stopping_and_reloading_datagrams(listener):
    path, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready(status="accepting mail")
    assert sock.recv(4096) == b"READY=1\nSTATUS=accepting mail"
    assert notifier.reloading()
    lines = sock.recv(4096).decode().splitlines()
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_namespace_address():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0smtpd-agent-notify-unit-test")
    sock.settimeout(5)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@smtpd-agent-notify-unit-test"}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.ready()


def test_a_vanished_manager_is_logged_not_raised(tmp_path):
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).stopping()
