"""Ports and binaries for the servers tests start. Tests share this machine with other
test runs, so a port probed free and closed can be taken before a server binds it (OSError
98). Servers we start bind port 0 and report the port they got: in-process ones from their
bound socket, `smtpd-agent serve` in its `server.ready` log line (tests/support.wait_for_ready).
Only daemons whose config takes a port number (clamd, rspamd, bench's Postfix: none binds
port 0) get a probed port; their start waits until they own it (`wait_until_listening`) and
retries with another (`start_on_probed_port`)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil

# How often a daemon's start retries when its probed port went to someone else first.
DAEMON_PORT_ATTEMPTS = 5


def find_daemon(path: str, override: str) -> str | None:
    """The daemon's binary: `path`, else the one on PATH, else None. The environment
    variable `override` names another (a missing path simulates a machine without it, to
    check that its tests skip, or fail with CI=true)."""
    named = os.environ.get(override)
    if named is not None:
        return named if os.access(named, os.X_OK) else None
    if os.access(path, os.X_OK):
        return path
    return shutil.which(os.path.basename(path))


def probe_port() -> int:
    """A port free a moment ago, for a daemon's config file only: the daemon's start must
    check with `port_owner` that it got the port, and retry with another when it did not."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortTaken(RuntimeError):
    """Another process listens on the port a daemon was configured with."""


def listening_pids(port: int) -> set[int]:
    """The processes listening on TCP `port` (any address)."""
    return {c.pid for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}


async def wait_for_listeners(port: int, count: int, timeout: float = 60.0) -> set[int]:
    """The processes listening on `port` once there are `count` of them (smtp.processes
    listeners share one port), or as they are after `timeout` seconds: the caller asserts."""
    deadline = time.monotonic() + timeout
    while len(pids := listening_pids(port)) != count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return pids


def port_owner(pid: int, port: int) -> bool | None:
    """Who listens on TCP `port`: True for process `pid` or one of its children (rspamd's
    workers), False for some other process (the daemon must retry with another port),
    None for no one yet."""
    owners = listening_pids(port)
    if not owners:
        return None
    try:
        parent = psutil.Process(pid)
        tree = {pid, *(child.pid for child in parent.children(recursive=True))}
    except psutil.NoSuchProcess:
        return False
    return bool(owners & tree)


def wait_until_listening(pid: int, port: int, *, running: Callable[[], bool],
                         answers: Callable[[], bool] = lambda: True, timeout: float,
                         pause: float = 0.1) -> bool:
    """Wait until process `pid` (or a child) listens on `port` and `answers()`: True then;
    False when it stopped `running` or `timeout` seconds passed first. Raises PortTaken
    when another process listens on the port. Listening sockets are looked at whenever
    it answers, otherwise at most once a second (scanning them costs)."""
    began = time.monotonic()
    checked = began
    while time.monotonic() < began + timeout:
        if not running():
            return False
        answered = answers()
        if answered or time.monotonic() - checked > 1:
            checked = time.monotonic()
            owner = port_owner(pid, port)
            if owner is False:
                raise PortTaken(port)
            if answered and owner:
                return True
        time.sleep(pause)
    return False


def start_on_probed_port(start_once: Callable[[], None], *, stop: Callable[[], None],
                         use_port: Callable[[int], None]) -> None:
    """Run a daemon's `start_once` (which raises PortTaken when someone else got its port);
    on PortTaken, `stop` it, give it a newly probed port (`use_port`) and start again,
    DAEMON_PORT_ATTEMPTS starts in all; the last one's PortTaken goes to the caller."""
    for _attempt in range(DAEMON_PORT_ATTEMPTS - 1):
        try:
            return start_once()
        except PortTaken:
            stop()
            use_port(probe_port())
    start_once()


@contextmanager
def held_closed_port() -> Iterator[int]:
    """A loopback port that refuses connections, for tests of an unreachable peer only.

    The socket stays bound (without SO_REUSEADDR, so no one else can bind the port) and
    never listens, until the block ends: a connect gets ECONNREFUSED. Never give this
    port to a server to bind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
