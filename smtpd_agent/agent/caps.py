"""The caps every message an agent sends must fit in, whoever wrote it: the built-in agent's
replies (agent/worker.py, agent/jobs.py) and what API callers send, reply or send from a
draft (mailbox/send.py) are decided here and nowhere else.

Stage 6's limits (issue 17): replies per hour to one correspondent and from one agent,
the workspace's outbound messages per hour and per day (all its agents together), and
the addresses one agent may write to for the first time in a day. Every outbound message
counts, whoever sent it. A writer takes the workspace's lock (`lock`), checks, stores and
records its recipients (`remember_recipients`) in one transaction, so two writers on two
machines cannot both take the last slot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

import asyncpg

from ..config import AgentSettings

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
# pg_advisory_xact_lock(WORKSPACE_LOCK, workspace id): one writer of a workspace at a time.
WORKSPACE_LOCK = 0x6177


class CapRule(StrEnum):
    """Which cap a message would exceed; the value is the config key that sets it."""

    CORRESPONDENT_PER_HOUR = "agent.correspondent_replies_per_hour"
    AGENT_PER_HOUR = "agent.agent_replies_per_hour"
    WORKSPACE_PER_HOUR = "agent.workspace_replies_per_hour"
    WORKSPACE_PER_DAY = "agent.workspace_replies_per_day"
    NEW_RECIPIENTS_PER_DAY = "agent.new_recipients_per_day"


WINDOW = {CapRule.CORRESPONDENT_PER_HOUR: HOUR, CapRule.AGENT_PER_HOUR: HOUR,
          CapRule.WORKSPACE_PER_HOUR: HOUR, CapRule.WORKSPACE_PER_DAY: DAY,
          CapRule.NEW_RECIPIENTS_PER_DAY: DAY}


@dataclass(frozen=True)
class Caps:
    """The agent.* limits; 0 allows none."""

    per_correspondent: int
    per_agent: int
    workspace_per_hour: int
    workspace_per_day: int
    new_recipients_per_day: int

    @classmethod
    def of(cls, settings: AgentSettings) -> Caps:
        return cls(settings.correspondent_replies_per_hour, settings.agent_replies_per_hour,
                   settings.workspace_replies_per_hour, settings.workspace_replies_per_day,
                   settings.new_recipients_per_day)

    def limit(self, rule: CapRule) -> int:
        return {CapRule.CORRESPONDENT_PER_HOUR: self.per_correspondent,
                CapRule.AGENT_PER_HOUR: self.per_agent,
                CapRule.WORKSPACE_PER_HOUR: self.workspace_per_hour,
                CapRule.WORKSPACE_PER_DAY: self.workspace_per_day,
                CapRule.NEW_RECIPIENTS_PER_DAY: self.new_recipients_per_day}[rule]


@dataclass(frozen=True)
class Counts:
    """What the caps are compared with, for one message to `recipients`."""

    to_correspondent: int  # the agent's messages in the last hour to the most written-to one
    from_agent: int        # the agent's messages in the last hour
    workspace_hour: int    # the workspace's outbound messages in the last hour
    workspace_day: int     # ... in the last day
    new_recipients: int    # recipients the agent never wrote to
    new_today: int         # first-time recipients of the agent in the last day


def exceeded(counts: Counts, caps: Caps) -> CapRule | None:
    """The first cap one more message would exceed, or None."""
    if counts.to_correspondent >= caps.per_correspondent:
        return CapRule.CORRESPONDENT_PER_HOUR
    if counts.from_agent >= caps.per_agent:
        return CapRule.AGENT_PER_HOUR
    if counts.workspace_hour >= caps.workspace_per_hour:
        return CapRule.WORKSPACE_PER_HOUR
    if counts.workspace_day >= caps.workspace_per_day:
        return CapRule.WORKSPACE_PER_DAY
    if counts.new_recipients and \
            counts.new_today + counts.new_recipients > caps.new_recipients_per_day:
        return CapRule.NEW_RECIPIENTS_PER_DAY
    return None


def describe(rule: CapRule, limit: int) -> str:
    """The reason a skipped job records and a refused API request names."""
    return {
        CapRule.CORRESPONDENT_PER_HOUR: f"rate limit: {limit} replies per hour to this "
                                        "correspondent",
        CapRule.AGENT_PER_HOUR: f"rate limit: {limit} replies per hour from this agent",
        CapRule.WORKSPACE_PER_HOUR: f"cap: {limit} replies per hour from this workspace",
        CapRule.WORKSPACE_PER_DAY: f"cap: {limit} replies per day from this workspace",
        CapRule.NEW_RECIPIENTS_PER_DAY: f"cap: {limit} first-time recipients per day for "
                                        "this agent",
    }[rule]


@dataclass(frozen=True)
class CapRefusal:
    rule: CapRule
    limit: int
    reason: str
    # Seconds until the message would fit (the oldest counted ones leave the window);
    # None: it never will (a cap of 0, or more new recipients than the cap allows).
    retry_after: float | None


DB = asyncpg.Pool | asyncpg.Connection


async def lock(connection: asyncpg.Connection, workspace_id: int) -> None:
    """Until COMMIT: the workspace's writers check and store one after the other."""
    await connection.execute("SELECT pg_advisory_xact_lock($1, $2)", WORKSPACE_LOCK,
                             workspace_id)


async def counts(db: DB, workspace_id: int, agent_id: int,
                 recipients: Sequence[str]) -> tuple[Counts, str | None]:
    """The counts for a message to `recipients`, and the recipient written to most."""
    addresses = sorted({r.lower() for r in recipients})
    row = await db.fetchrow(
        """SELECT (SELECT count(*) FROM messages
                    WHERE workspace_id = $1 AND agent_id = $2 AND direction = 'outbound'
                      AND received_at > now() - $4::interval) AS from_agent,
                  (SELECT count(*) FROM messages
                    WHERE workspace_id = $1 AND direction = 'outbound'
                      AND received_at > now() - $4::interval) AS workspace_hour,
                  (SELECT count(*) FROM messages
                    WHERE workspace_id = $1 AND direction = 'outbound'
                      AND received_at > now() - $5::interval) AS workspace_day,
                  (SELECT count(*) FROM unnest($3::text[]) AS r(address)
                    WHERE NOT EXISTS (SELECT 1 FROM agent_recipients
                                       WHERE agent_id = $2 AND address = r.address))
                      AS new_recipients,
                  (SELECT count(*) FROM agent_recipients
                    WHERE agent_id = $2 AND workspace_id = $1
                      AND first_sent_at > now() - $5::interval) AS new_today""",
        workspace_id, agent_id, addresses, HOUR, DAY)
    busiest = await db.fetchrow(
        """SELECT lower(rcpt_to) AS address, count(*) AS sent FROM messages
            WHERE workspace_id = $1 AND agent_id = $2 AND direction = 'outbound'
              AND received_at > now() - $4::interval AND lower(rcpt_to) = ANY($3::text[])
            GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1""", workspace_id, agent_id, addresses, HOUR)
    return Counts(busiest["sent"] if busiest else 0, row["from_agent"], row["workspace_hour"],
                  row["workspace_day"], row["new_recipients"], row["new_today"]), \
        (busiest["address"] if busiest else None)


def _counted(rule: CapRule, workspace_id: int, agent_id: int,
             busiest: str | None) -> tuple[str, list[object]]:
    """The timestamps `rule` counts (as `at`), and their query's arguments."""
    if rule is CapRule.CORRESPONDENT_PER_HOUR:
        return ("""SELECT received_at AS at FROM messages
                    WHERE workspace_id = $3 AND agent_id = $4 AND direction = 'outbound'
                      AND lower(rcpt_to) = $5""", [workspace_id, agent_id, busiest])
    if rule is CapRule.AGENT_PER_HOUR:
        return ("""SELECT received_at AS at FROM messages
                    WHERE workspace_id = $3 AND agent_id = $4 AND direction = 'outbound'""",
                [workspace_id, agent_id])
    if rule is CapRule.NEW_RECIPIENTS_PER_DAY:
        return ("""SELECT first_sent_at AS at FROM agent_recipients
                    WHERE workspace_id = $3 AND agent_id = $4""", [workspace_id, agent_id])
    return ("""SELECT received_at AS at FROM messages
                WHERE workspace_id = $3 AND direction = 'outbound'""", [workspace_id])


async def retry_after(db: DB, rule: CapRule, found: Counts, caps: Caps, workspace_id: int,
                      agent_id: int, busiest: str | None) -> float | None:
    """Seconds until enough counted messages leave the rule's window for one more."""
    limit = caps.limit(rule)
    counted = {CapRule.CORRESPONDENT_PER_HOUR: found.to_correspondent,
               CapRule.AGENT_PER_HOUR: found.from_agent,
               CapRule.WORKSPACE_PER_HOUR: found.workspace_hour,
               CapRule.WORKSPACE_PER_DAY: found.workspace_day,
               CapRule.NEW_RECIPIENTS_PER_DAY: found.new_today}[rule]
    wanted = found.new_recipients if rule is CapRule.NEW_RECIPIENTS_PER_DAY else 1
    if wanted > limit:
        return None
    counted_sql, args = _counted(rule, workspace_id, agent_id, busiest)
    # the (counted + wanted - limit)-th oldest in the window must leave it
    seconds = await db.fetchval(
        f"""SELECT extract(epoch FROM c.at + $1::interval - now())::float8
              FROM ({counted_sql}) c WHERE c.at > now() - $1::interval
             ORDER BY c.at OFFSET $2 LIMIT 1""",
        WINDOW[rule], counted + wanted - limit - 1, *args)
    return None if seconds is None else max(1.0, float(math.ceil(seconds)))


async def check(db: DB, workspace_id: int, agent_id: int, recipients: Sequence[str],
                caps: Caps) -> CapRefusal | None:
    """Whether one more message from the agent to `recipients` fits every cap."""
    found, busiest = await counts(db, workspace_id, agent_id, recipients)
    rule = exceeded(found, caps)
    if rule is None:
        return None
    limit = caps.limit(rule)
    return CapRefusal(rule, limit, describe(rule, limit),
                      await retry_after(db, rule, found, caps, workspace_id, agent_id, busiest))


async def remember_recipients(connection: asyncpg.Connection, workspace_id: int, agent_id: int,
                              recipients: Sequence[str]) -> None:
    """After storing a message: its recipients are no longer first-time ones for the agent."""
    await connection.executemany(
        """INSERT INTO agent_recipients (workspace_id, agent_id, address)
           VALUES ($1, $2, lower($3))
           ON CONFLICT (agent_id, address) DO UPDATE SET last_sent_at = now()""",
        [(workspace_id, agent_id, address) for address in dict.fromkeys(recipients)])
