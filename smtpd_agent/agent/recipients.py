"""Whom an agent may write to, whoever wrote the message: the built-in agent's replies
(agent/worker.py) and what API callers send, reply or send from a draft (mailbox/send.py)
are decided here and nowhere else, as agent/caps.py decides the caps.

Two rules, in this order, for each recipient: the workspace's suppression list (a hard
bounce, a complaint or a manual entry; outbound/queue.py) and the allow/block lists in the
send direction (acl/, store/acl.py). The outbound queue applies both again when it queues
and sends; asking here first refuses before anything is composed or stored, and names the
rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import asyncpg

from ..acl import AclDecision, AclDirection
from ..outbound.queue import normalize_address
from ..store import acl


class RecipientRule(StrEnum):
    """Which rule refuses a recipient; the value is the `rule` an API refusal names."""

    SUPPRESSION = "suppression"
    ACL = "acl"


@dataclass(frozen=True)
class RecipientRefusal:
    address: str
    rule: RecipientRule
    acl: AclDecision | None = None  # the allow/block decision, for RecipientRule.ACL

    @property
    def reason(self) -> str:
        """Log-safe, without the address: what a skipped agent job records."""
        if self.rule is RecipientRule.SUPPRESSION:
            return "correspondent suppressed"
        assert self.acl is not None
        return f"recipient refused by the allow/block lists ({self.acl.reason})"

    @property
    def error(self) -> str:
        """What an API refusal says, naming the refused address."""
        if self.rule is RecipientRule.SUPPRESSION:
            return (f"{self.address} is on the workspace's suppression list (a hard bounce, "
                    "a complaint or a manual entry)")
        assert self.acl is not None
        return f"{self.address} is refused by the allow/block lists: {self.acl.reason}"


DB = asyncpg.Pool | asyncpg.Connection


async def check(db: DB, workspace_id: int, agent_id: int,
                recipients: Sequence[str]) -> RecipientRefusal | None:
    """The refusal of the first refused recipient (in the order given), or None."""
    addresses = list(dict.fromkeys(normalize_address(r) for r in recipients))
    suppressed = {r["address"] for r in await db.fetch(
        """SELECT address FROM suppressions
            WHERE workspace_id = $1 AND address = ANY($2::text[])""",
        workspace_id, addresses)}
    for address in addresses:
        if address in suppressed:
            return RecipientRefusal(address, RecipientRule.SUPPRESSION)
        decision = await acl.check(db, workspace_id, agent_id, AclDirection.SEND, address)
        if decision.refused:
            return RecipientRefusal(address, RecipientRule.ACL, decision)
    return None
