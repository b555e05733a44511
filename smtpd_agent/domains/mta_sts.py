"""MTA-STS (RFC 8461) and TLS-RPT (RFC 8460): the policy, its DNS records, its HTTPS route.

Pure pieces: the policy (mode, our MX hosts, max_age) and its text, the
`_mta-sts` TXT whose id is a digest of the policy text (so it changes exactly
when the policy does, on every host at once, without state), and the
`_smtp._tls` TXT. The delegated-zone DNS server serves the records; `domain
add` prints them for self-managed domains.

`mta_sts_route()` is the `/.well-known/mta-sts.txt` handler without any HTTP
framework: the HTTP surface mounts it, behind a TLS-terminating proxy that
holds a certificate for each `mta-sts.<domain>` (RFC 8461 3.3 needs HTTPS with a
valid certificate; we never see the TLS).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import asyncpg

from ..addresses import OurDomains
from ..config import Settings
from ..store import domains as store
from .hosts import mx_hosts

POLICY_PATH = "/.well-known/mta-sts.txt"  # RFC 8461 3.3
POLICY_LABEL = "mta-sts"
ID_LENGTH = 20  # RFC 8461 3.1: id is 1-32 letters and digits


@dataclass(frozen=True)
class MtaStsPolicy:
    mode: str
    mx: tuple[str, ...]
    max_age: int

    def text(self) -> str:
        """RFC 8461 3.2: key/value lines, CRLF (LF is tolerated, CRLF is what it shows)."""
        lines = ["version: STSv1", f"mode: {self.mode}", *(f"mx: {h}" for h in self.mx),
                 f"max_age: {self.max_age}"]
        return "".join(line + "\r\n" for line in lines)

    @property
    def id(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()[:ID_LENGTH]


def policy_for(settings: Settings) -> MtaStsPolicy:
    """One policy for every domain: all of them point their MX at the same hosts."""
    return MtaStsPolicy(settings.mta_sts.mode, tuple(dict.fromkeys(mx_hosts(settings))),
                        settings.mta_sts.max_age)


def sts_txt(policy: MtaStsPolicy) -> str:
    return f"v=STSv1; id={policy.id}"


def tlsrpt_rua(settings: Settings) -> str:
    configured = [u.strip() for u in settings.mta_sts.tlsrpt_rua.split(",") if u.strip()]
    return ",".join(configured or [f"mailto:tls-reports@{settings.server.default_domain}"])


def tlsrpt_txt(settings: Settings) -> str:
    return f"v=TLSRPTv1; rua={tlsrpt_rua(settings)}"  # RFC 8460 3


def policy_host(domain: str) -> str:
    return f"{POLICY_LABEL}.{domain}"


def proxy_host(settings: Settings) -> str:
    return settings.mta_sts.proxy_host or policy_host(settings.server.default_domain)


@dataclass(frozen=True)
class HttpReply:
    status: int
    content_type: str
    body: bytes


NOT_FOUND = HttpReply(404, "text/plain; charset=utf-8", b"not found\n")


async def mta_sts_route(db: asyncpg.Pool | asyncpg.Connection, settings: Settings,
                        host: str, path: str = POLICY_PATH) -> HttpReply:
    """The policy for `Host: mta-sts.<domain>`, for a domain that receives mail through us
    (the default domain, a workspace under it, or a verified custom domain, delegated or not)."""
    name = host.strip().lower().rsplit(":", 1)[0] if not host.startswith("[") else ""
    if path != POLICY_PATH or not name.startswith(POLICY_LABEL + "."):
        return NOT_FOUND
    domain = name.removeprefix(POLICY_LABEL + ".").rstrip(".")
    if not OurDomains(settings.server.default_domain).is_ours(domain):
        found = await store.find_domain(db, domain)
        if found is None or not found.receives:
            return NOT_FOUND
    # RFC 8461 3.3: media type text/plain
    return HttpReply(200, "text/plain", policy_for(settings).text().encode())
