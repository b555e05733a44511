"""Ports for the servers tests start. Tests share this machine with other test runs, so a
port probed free and closed can be taken before a server binds it (OSError 98). Servers
we start bind port 0 and report the port they got: in-process ones from their bound
socket, `smtpd-agent serve` in its `server.ready` log line (tests/support.wait_for_ready).
Only daemons whose config takes a port number (clamd, rspamd: neither binds port 0) get a
probed port; their start checks that they own it (`port_owner`) and retries with another."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

# How often a daemon's start retries when its probed port went to someone else first.
DAEMON_PORT_ATTEMPTS = 5


def probe_port() -> int:
    """A port free a moment ago, for a daemon's config file only: the daemon's start must
    check with `port_owner` that it got the port, and retry with another when it did not."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortTaken(RuntimeError):
    """Another process listens on the port a daemon was configured with."""


def port_owner(pid: int, port: int) -> bool | None:
    """Who listens on TCP `port`: True for process `pid` or one of its children (rspamd's
    workers), False for some other process (the daemon must retry with another port),
    None for no one yet."""
    owners = {c.pid for c in psutil.net_connections("tcp")
              if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    if not owners:
        return None
    try:
        parent = psutil.Process(pid)
        tree = {pid, *(child.pid for child in parent.children(recursive=True))}
    except psutil.NoSuchProcess:
        return False
    return bool(owners & tree)


@contextmanager
def held_closed_port() -> Iterator[int]:
    """A loopback port that refuses connections, for tests of an unreachable peer only.

    The socket stays bound (without SO_REUSEADDR, so no one else can bind the port) and
    never listens, until the block ends: a connect gets ECONNREFUSED. Never give this
    port to a server to bind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
