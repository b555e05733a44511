"""Allow and block lists: whom a workspace's agents receive from and write to.

Pure decisions over the entries the store found (store/acl.py). Enforced at
RCPT and DATA for receiving (smtp/handler.py, pipeline.py: `550 5.7.1`) and
where mail leaves for replying and sending (outbound/queue.py, outbound/worker.py),
never by a model. The CLI is `smtpd-agent acl` (acl/cli.py).

An entry is an exact address (`bob@example.com`) or a domain (`@example.com`),
which covers the domain and every subdomain of it (`mx.eu.example.com`), and
applies to one direction (`receive`, `send`) or `both`. Entries belong to a
workspace, and optionally to one agent of it. For one address:

1. the most specific matching entry decides: an agent's own entry before the
   workspace's; an exact address before a domain; a longer domain before a
   shorter one; at equal rank, block wins;
2. with no matching entry, the address is allowed, unless an allow entry exists
   for that direction (the workspace's, or the agent's): then allow lists are in
   force and anyone not on them is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class AclAction(Enum):
    ALLOW = "allow"
    BLOCK = "block"


class AclDirection(Enum):
    RECEIVE = "receive"
    SEND = "send"
    BOTH = "both"


class AclVerdict(Enum):
    """The decision for one address; BLOCKED and NOT_ALLOWED refuse it."""

    ALLOWED = "allowed"  # matched an allow entry
    UNLISTED = "unlisted"  # no entry, no allow list in force
    BLOCKED = "blocked"  # matched a block entry
    NOT_ALLOWED = "not allowed"  # allow lists in force, not on them

    @property
    def refused(self) -> bool:
        return self in (AclVerdict.BLOCKED, AclVerdict.NOT_ALLOWED)


@dataclass(frozen=True)
class AclEntry:
    action: AclAction
    pattern: str  # "user@example.com" or "@example.com", lower-case
    agent_id: int | None = None  # None: the whole workspace


@dataclass(frozen=True)
class AclDecision:
    verdict: AclVerdict
    entry: AclEntry | None = None

    @property
    def refused(self) -> bool:
        return self.verdict.refused

    @property
    def reason(self) -> str:
        """Short and log-safe: which rule refused (or allowed) the address."""
        if self.entry is not None:
            scope = "agent" if self.entry.agent_id is not None else "workspace"
            return f"{self.verdict.value} by {scope} entry {self.entry.pattern}"
        return self.verdict.value


UNLISTED = AclDecision(AclVerdict.UNLISTED)


class AclPatternError(ValueError):
    """Not an address or an @domain."""


def normalize_pattern(text: str) -> str:
    """`Bob@Example.COM.` -> `bob@example.com`; `example.com` or `@example.com` -> `@example.com`."""
    value = text.strip().strip("<>").strip().lower().rstrip(".")
    local, at, domain = value.rpartition("@")
    if not at:
        local, domain = "", value
    labels = domain.split(".")
    if (not domain or len(domain) > 253 or len(labels) < 2
            or any(not label or len(label) > 63 or not all(c.isalnum() or c in "-_" for c in label)
                   for label in labels)):
        raise AclPatternError(f"{text!r} is neither an address nor a domain (@example.com)")
    if any(ch.isspace() or ch in "<>,;\"()[]\\" for ch in local) or local.count("@"):
        raise AclPatternError(f"{text!r}: unusable local part")
    return f"{local}@{domain}"


def candidates(address: str) -> list[str]:
    """The patterns that would match `address`: itself, its domain, each parent domain.

    Empty for something that is not an address (the null sender): nothing matches it.
    """
    local, at, domain = address.strip().strip("<>").lower().rstrip(".").rpartition("@")
    if not at or not local or not domain:
        return []
    labels = domain.split(".")
    return [f"{local}@{domain}"] + [f"@{'.'.join(labels[i:])}" for i in range(len(labels))]


def _rank(entry: AclEntry) -> tuple[int, int, int, int]:
    local, _, domain = entry.pattern.rpartition("@")
    return (entry.agent_id is not None, bool(local), domain.count(".") if not local else 0,
            entry.action is AclAction.BLOCK)


def decide(address: str, matching: list[AclEntry], allow_list_in_force: bool) -> AclDecision:
    """`matching`: the entries whose pattern is one of `candidates(address)` (the store's query)."""
    wanted = set(candidates(address))
    found = [entry for entry in matching if entry.pattern in wanted]
    if found:
        best = max(found, key=_rank)
        verdict = AclVerdict.BLOCKED if best.action is AclAction.BLOCK else AclVerdict.ALLOWED
        return AclDecision(verdict, best)
    if allow_list_in_force:
        return AclDecision(AclVerdict.NOT_ALLOWED)
    return UNLISTED
