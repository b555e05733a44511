"""Readiness and state for systemd: the sd_notify datagram protocol.

With `Type=notify` systemd passes a socket in `NOTIFY_SOCKET` and waits for
`READY=1` before it calls the unit started (so `systemctl start` returns only
once port 25 is bound and the database migrated). We also say `RELOADING=1`
around a SIGHUP reload and `STOPPING=1` when a stop begins.

The protocol is one newline-separated `KEY=VALUE` datagram per state change to
a Unix socket, a path or, with a leading `@`, an abstract-namespace name
(sd_notify(3), "Notes"). It is small enough that a dependency would add more
than it saves; without `NOTIFY_SOCKET` (a terminal, Docker) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("smtpd_agent.systemd")


class Notifier:
    """Sends state lines to the service manager named by `NOTIFY_SOCKET`, if any."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # sd_notify(3): an address starting with "@" is in the abstract namespace.
        self.address = "\0" + address[1:] if address.startswith("@") else address

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str | int) -> bool:
        """Send `KEY=VALUE` lines (keyword names upper-cased); False when nobody listens.

        A failure is logged, never raised: the server must not stop serving mail
        because the service manager went away.
        """
        if not self.address:
            return False
        payload = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(payload.encode())
        except OSError as error:
            log.warning("systemd.notify_failed", error=str(error), state=payload)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(ready=1, **({"status": status} if status else {}))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this reload to
        # its request; older managers ignore the field.
        return self.notify(reloading=1, monotonic_usec=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        return self.notify(stopping=1)
