"""An authoritative DNS server on loopback for tests (dnslib wire format, UDP and TCP).

Tests write records at run time and point the server's real resolver at
`server.nameserver` ("127.0.0.1:<port>"), so every lookup crosses a socket
exactly as in production. Per name, the server can also stay silent (the
client times out) or answer SERVFAIL, which is how temperror paths are tested.

It serves one flat namespace: any name it has no records for is NXDOMAIN
(or NODATA when a longer name below it exists), with an SOA in the authority
section so resolvers may cache the negative answer (RFC 2308).

Delegation: `name_server(host, address, port)` says where a name server
listens; once NS records for a zone point at such a host (the parent's
delegation, published with `add(zone, "NS", host)`), queries for names in the
zone are forwarded to it, as a recursive resolver would follow the referral.
Without the NS records nothing is forwarded, as on the internet.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from dnslib import (AAAA, CNAME, MX, NS, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSLabel,
                    DNSRecord)

UDP_PAYLOAD = 512  # RFC 1035 4.2.1 without EDNS; larger answers are truncated (TC) -> TCP
TXT_CHUNK = 255  # RFC 1035 3.3.14: one character-string holds at most 255 octets


def _key(name: str) -> str:
    return name.rstrip(".").lower()


def split_txt(value: str | bytes) -> list[bytes]:
    """Split a long TXT value (a DKIM RSA key) into 255-octet character-strings."""
    data = value.encode() if isinstance(value, str) else value
    return [data[i:i + TXT_CHUNK] for i in range(0, len(data), TXT_CHUNK)] or [b""]


@dataclass
class Zone:
    """Records by lower-case name, plus the names that time out or SERVFAIL."""

    records: dict[str, list[tuple[str, object, int]]] = field(default_factory=dict)
    timeout: set[str] = field(default_factory=set)
    servfail: set[str] = field(default_factory=set)
    # name server host -> (address, port) that delegated zones are forwarded to
    name_servers: dict[str, tuple[str, int]] = field(default_factory=dict)


class DnsTestServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.zone = Zone()
        self.lock = threading.Lock()
        self.queries: list[tuple[str, str, str]] = []  # (transport, name, type)
        self._servers: list[socketserver.BaseServer] = []
        self.port = 0

    # -- zone editing ------------------------------------------------------------------

    def add(self, name: str, rtype: str, value: object, ttl: int = 300) -> None:
        rtype = rtype.upper()
        if rtype in ("TXT", "SPF"):
            if isinstance(value, (str, bytes)):
                value = split_txt(value)
            else:
                value = [v.encode() if isinstance(v, str) else v for v in value]  # type: ignore
        with self.lock:
            self.zone.records.setdefault(_key(name), []).append((rtype, value, ttl))

    def txt(self, name: str, *values: str | bytes | list[str | bytes], ttl: int = 300) -> None:
        for value in values:
            self.add(name, "TXT", value, ttl)

    def a(self, name: str, *addresses: str) -> None:
        for address in addresses:
            self.add(name, "AAAA" if ":" in address else "A", address)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Delete the records of `name` (of one type, or all)."""
        with self.lock:
            kept = [r for r in self.zone.records.get(_key(name), [])
                    if rtype is not None and r[0] != rtype.upper()]
            if kept:
                self.zone.records[_key(name)] = kept
            else:
                self.zone.records.pop(_key(name), None)

    def name_server(self, host: str, address: str, port: int) -> None:
        """Where the name server `host` listens (its A record, plus the test's port)."""
        with self.lock:
            self.zone.name_servers[_key(host)] = (address, port)
        self.a(host, address)

    def _delegated_to(self, name: str) -> tuple[str, int] | None:
        """The server a resolver would follow the parent's NS referral to, if any."""
        labels = name.split(".")
        for i in range(len(labels)):
            owner = ".".join(labels[i:])
            for rtype, value, _ttl in self.zone.records.get(owner, []):
                if rtype == "NS" and _key(str(value)) in self.zone.name_servers:
                    return self.zone.name_servers[_key(str(value))]
        return None

    def set_timeout(self, name: str) -> None:
        """Never answer queries for `name` (a resolver sees a timeout)."""
        with self.lock:
            self.zone.timeout.add(_key(name))

    def set_servfail(self, name: str) -> None:
        with self.lock:
            self.zone.servfail.add(_key(name))

    def clear(self) -> None:
        with self.lock:
            self.zone = Zone()
            self.queries.clear()

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    # -- answering ---------------------------------------------------------------------

    def _rdata(self, rtype: str, value: object) -> object:
        if rtype == "A":
            return A(value)
        if rtype == "AAAA":
            return AAAA(value)
        if rtype in ("TXT", "SPF"):
            return TXT(value)
        if rtype == "MX":
            preference, exchange = value if isinstance(value, tuple) else (10, value)
            return MX(exchange, preference)
        if rtype == "PTR":
            return PTR(value)
        if rtype == "CNAME":
            return CNAME(value)
        if rtype == "NS":
            return NS(value)
        raise ValueError(f"unsupported record type {rtype}")

    def _rr(self, name: str, rtype: str, value: object, ttl: int) -> RR:
        return RR(DNSLabel(name), getattr(QTYPE, rtype), ttl=ttl, rdata=self._rdata(rtype, value))

    def _exists(self, name: str) -> bool:
        """A name exists if it has records or is an empty non-terminal (RFC 8020)."""
        suffix = "." + name
        zone = self.zone
        return any(n == name or n.endswith(suffix)
                   for n in (*zone.records, *zone.timeout, *zone.servfail))

    def answer(self, data: bytes, transport: str) -> bytes | None:
        """The response to one query packet, or None to stay silent."""
        request = DNSRecord.parse(data)
        reply = request.reply()  # sets QR, AA, RD; copies the question
        # Raw label bytes, not dnslib's escaped text form, so names with spaces or
        # other odd octets (the SPF suite has some) match the zone keys.
        name = b".".join(request.q.qname.label).decode("utf-8", "replace").lower()
        qtype = QTYPE.get(request.q.qtype)
        with self.lock:
            self.queries.append((transport, name, str(qtype)))
            delegated = self._delegated_to(name)
        if delegated is not None:
            try:
                return request.send(delegated[0], delegated[1], tcp=transport == "tcp",
                                    timeout=2)
            except OSError:
                reply.header.rcode = RCODE.SERVFAIL
                return reply.pack()
        with self.lock:
            zone = self.zone
            if name in zone.servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply.pack()
            owner, seen = name, set()
            while True:
                records = zone.records.get(owner, [])
                matching = [r for r in records if r[0] == qtype]
                cnames = [r for r in records if r[0] == "CNAME"]
                if matching:
                    for rtype, value, ttl in matching:
                        reply.add_answer(self._rr(owner, rtype, value, ttl))
                    break
                if cnames and qtype != "CNAME" and owner not in seen and len(seen) < 8:
                    seen.add(owner)
                    _, target, ttl = cnames[0]
                    reply.add_answer(self._rr(owner, "CNAME", target, ttl))
                    owner = _key(str(target))
                    continue
                if owner in zone.timeout:
                    return None
                if not self._exists(owner):
                    reply.header.rcode = RCODE.NXDOMAIN
                reply.add_auth(RR(".", QTYPE.SOA, ttl=60, rdata=SOA(
                    "ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, 60))))
                break
        packed = reply.pack()
        if transport == "udp":
            limit = UDP_PAYLOAD
            if request.ar and any(rr.rtype == QTYPE.OPT for rr in request.ar):
                limit = max(UDP_PAYLOAD, next(rr.rclass for rr in request.ar
                                              if rr.rtype == QTYPE.OPT))
            if len(packed) > limit:
                truncated = request.reply()
                truncated.header.tc = 1
                packed = truncated.pack()
        return packed

    # -- sockets -----------------------------------------------------------------------

    def start(self) -> None:
        server = self

        class UdpHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                response = server.answer(data, "udp")
                if response is not None:
                    sock.sendto(response, self.client_address)

        class TcpHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                sock.settimeout(5)
                try:
                    while True:
                        header = _recv_exact(sock, 2)
                        if header is None:
                            return
                        data = _recv_exact(sock, struct.unpack("!H", header)[0])
                        if data is None:
                            return
                        response = server.answer(data, "tcp")
                        if response is None:
                            return
                        sock.sendall(struct.pack("!H", len(response)) + response)
                except OSError:
                    return

        for _attempt in range(20):
            udp = socketserver.ThreadingUDPServer((self.host, 0), UdpHandler)
            port = udp.server_address[1]
            try:
                tcp = socketserver.ThreadingTCPServer((self.host, port), TcpHandler)
            except OSError:
                udp.server_close()
                continue
            break
        else:  # pragma: no cover
            raise RuntimeError("no free port for UDP and TCP")
        for srv in (udp, tcp):
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True).start()
        self._servers = [udp, tcp]
        self.port = port

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._servers = []

    def __enter__(self) -> DnsTestServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def load(self, records: Iterable[tuple[str, str, object]]) -> None:
        for name, rtype, value in records:
            self.add(name, rtype, value)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
