"""Addresses and domains as values: the one place that says whether a domain is ours.

`<handle>[+tag]@<workspace>.<default domain>` is how a workspace's agents are
reached without a domain of their own; a custom domain is ours only once
registered (and, to receive, verified), which takes the database: that half is
`routing.Router` (cached) and `store.domains`. Everything here is pure, so the
listener, the webhooks, the agent, outbound mail, the DNS records and the CLI
all ask the same question the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

POSTMASTER = "postmaster"
# A VERP token (outbound/verp.py makes them): lower-case letters and digits.
VERP_TOKEN = re.compile(r"^[a-z0-9]{16,64}$")


def normalize_domain(name: str) -> str:
    """Lower-case, without the root's trailing dot: how every domain is compared."""
    return name.strip().lower().rstrip(".")


def within(name: str, zone: str) -> bool:
    """`name` is `zone` or a name below it (by labels: `xacme.test` is not within `acme.test`)."""
    return name == zone or name.endswith("." + zone)


def domain_of(address: str) -> str:
    """The domain of an address (of a bare domain, itself), lower-case, no outer dots."""
    return address.rpartition("@")[2].strip().lower().strip(".")


@dataclass(frozen=True)
class Address:
    """An address as routing reads it: `local+tag@domain`, lower-cased, tag split off."""

    local: str
    tag: str | None
    domain: str

    def __str__(self) -> str:
        tag = f"+{self.tag}" if self.tag is not None else ""
        return f"{self.local}{tag}@{self.domain}"


def parse_address(address: str) -> Address | None:
    """Split `handle+tag@domain`, lower-cased; None if it is not an address at all."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at or not local or not domain:
        return None
    local = local.lower()
    domain = normalize_domain(domain)
    handle, plus, tag = local.partition("+")
    return Address(local=handle, tag=tag if plus else None, domain=domain)


def token_of(local_part: str, prefix: str) -> str | None:
    """The token of a VERP local part `<prefix>-<token>`, or None if it is not one of ours."""
    head, dash, token = local_part.lower().partition("-")
    if not dash or head != prefix or not VERP_TOKEN.match(token):
        return None
    return token


def workspace_of(domain: str, default_domain: str) -> str | None | bool:
    """The workspace slug for a domain under ours; True for ours without a workspace; None if foreign."""
    if domain == default_domain:
        return True
    if not within(domain, default_domain):
        return None
    label = domain[: -len(default_domain) - 1]
    return label if "." not in label else True


@dataclass(frozen=True)
class OurDomains:
    """The operator's default domain and the workspaces under it (`server.default_domain`)."""

    default: str

    def is_ours(self, domain: str) -> bool:
        """The default domain or a name under it; custom domains need the database."""
        return within(normalize_domain(domain), self.default)

    def workspace(self, domain: str) -> str | None:
        """The slug of `<slug>.<default domain>`; None for any other domain."""
        found = workspace_of(normalize_domain(domain), self.default)
        return found if isinstance(found, str) else None

    def workspace_domain(self, slug: str) -> str:
        return f"{slug}.{self.default}"

    def agent_address(self, handle: str, slug: str) -> str:
        return f"{handle}@{self.workspace_domain(slug)}"
