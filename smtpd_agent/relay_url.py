"""`outbound.relay` = smtp://[user:password@]host[:port][?tls=starttls|implicit|none], parsed.

Pure, so configuration validation and the SMTP transport read it the same way. A typed
value below config (docs/architecture.md: layers), so config never imports the outbound
feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

TlsMode = Literal["starttls", "implicit", "none"]
# RFC 8314 3.3 (465, implicit TLS), RFC 6409 (587, submission with STARTTLS), RFC 5321 (25)
DEFAULT_PORTS: dict[TlsMode, int] = {"starttls": 587, "implicit": 465, "none": 25}


class RelayUrlError(ValueError):
    """The relay URL cannot be used; the message never contains the password."""


@dataclass(frozen=True)
class RelayUrl:
    host: str
    port: int
    tls: TlsMode
    username: str = ""
    password: str = field(default="", repr=False)

    @property
    def safe(self) -> str:
        """For logs: never the password."""
        user = f"{self.username}@" if self.username else ""
        return f"smtp://{user}{self.host}:{self.port}?tls={self.tls}"


def parse_relay_url(url: str) -> RelayUrl:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise RelayUrlError(f"not a valid URL ({error})") from None
    if parts.scheme not in ("smtp", "smtps"):
        raise RelayUrlError(f"expected smtp://, got {parts.scheme or 'no'} scheme")
    if not parts.hostname:
        raise RelayUrlError("no host")
    query = parse_qs(parts.query)
    unknown = set(query) - {"tls"}
    if unknown:
        raise RelayUrlError(f"unknown parameter {sorted(unknown)[0]!r}")
    tls = query.get("tls", ["implicit" if parts.scheme == "smtps" else "starttls"])[-1]
    if tls not in DEFAULT_PORTS:
        raise RelayUrlError(f"tls must be starttls, implicit or none, got {tls!r}")
    mode: TlsMode = tls  # type: ignore[assignment]
    return RelayUrl(host=parts.hostname, port=port or DEFAULT_PORTS[mode], tls=mode,
                    username=unquote(parts.username or ""), password=unquote(parts.password or ""))
