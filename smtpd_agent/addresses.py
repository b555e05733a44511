"""Client addresses as the unit of per-client limits, shared by every listener.

One host usually holds a whole IPv6 /64 and can pick a new address from it for
each connection, so a limit counted per IPv6 address is no limit: the SMTP
connection limits (smtp/limits.py) and the DNS server's rate limiter and TCP
slots (dnsserver/server.py) all count by the key below.
"""

from __future__ import annotations

import socket
from typing import Final

IPV4_MAPPED: Final = bytes(10) + b"\xff\xff"


def client_key(ip: str) -> str:
    """The unit a per-client limit counts: an IPv4 address, or an IPv6 address's /64.

    An IPv4-mapped IPv6 address counts as its IPv4 address; a zone (`%eth0`) is
    dropped; anything else (a Unix socket peer) is its own key. Once per
    connection or datagram: socket.inet_pton rather than the ipaddress module (~10x faster).
    """
    if ":" not in ip:
        return ip
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    except OSError:
        return ip
    if packed[:12] == IPV4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"
