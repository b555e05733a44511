"""`smtpd-agent worker` (reply workers without the listener) and `smtpd-agent jobs`.

Registered into the CLI's COMMAND_GROUPS; the worker runs the same Service as `serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import structlog

from ..cli_common import Parents, deployment_settings, emit
from ..config import Settings
from ..outbound.worker import OutboundWorker
from ..runtime import Runtime
from .worker import AgentWorkers

log = structlog.get_logger("smtpd_agent.agent")


def register_agent(commands: Any, parents: Parents) -> None:
    worker = commands.add_parser("worker", parents=[parents.common],
                                 help="run agent reply workers only (no SMTP listener)")
    worker.add_argument("--concurrency", type=int, metavar="N",
                        help="jobs at once in this process (default: agent.workers)")
    worker.add_argument("--with-outbound", action="store_true",
                        help="also run the outbound delivery worker in this process")
    worker.set_defaults(run=run_worker)
    jobs = commands.add_parser("jobs", parents=[parents.common, parents.listing],
                               help="recent agent jobs with their state")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--workspace", metavar="SLUG")
    jobs.set_defaults(handler=cmd_jobs)


def run_worker(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(work(settings, args.concurrency, getattr(args, "with_outbound", False), args))
    return 0


async def work(settings: Settings, concurrency: int | None, with_outbound: bool = False,
               args: argparse.Namespace | None = None) -> None:
    runtime = await Runtime.open(settings)
    try:  # replies come from <handle>@<workspace>.<the deployment's default domain>
        runtime.settings = await deployment_settings(runtime.pool, settings,
                                                     args or argparse.Namespace())
    except BaseException:
        await runtime.close()
        raise
    workers = AgentWorkers(runtime, concurrency=max(1, concurrency or settings.agent.workers))
    outbound = OutboundWorker(runtime) if with_outbound else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await workers.start()
        if outbound is not None:
            await outbound.start()
        await stop.wait()
    finally:
        log.info("agent.worker.stopping")
        if outbound is not None:
            await outbound.stop()
        await workers.stop()
        await runtime.close()


async def cmd_jobs(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    rows = [dict(r) for r in await db.fetch(
        """SELECT j.id, w.slug AS workspace, a.handle AS agent, j.status, j.attempts,
                  j.skip_reason, j.last_error, j.reply_message_id, j.model, j.input_tokens,
                  j.output_tokens, j.latency_ms, j.created_at, j.finished_at
             FROM agent_jobs j
             JOIN agents a ON a.id = j.agent_id AND a.workspace_id = j.workspace_id
             JOIN workspaces w ON w.id = j.workspace_id
            WHERE $1::text IS NULL OR w.slug = $1
            ORDER BY j.id DESC LIMIT $2""", args.workspace, args.limit)]
    emit(rows, args.json, lambda items: [
        f"#{r['id']:<6} {r['workspace']}/{r['agent']:<16} {r['status']:<8} "
        f"attempts={r['attempts']} "
        + (f"reason={r['skip_reason']!r} " if r["skip_reason"] else "")
        + (f"error={r['last_error']!r} " if r["last_error"] and r["status"] != "done" else "")
        + (f"reply=#{r['reply_message_id']} tokens={r['input_tokens']}+{r['output_tokens']} "
           f"latency={r['latency_ms']}ms" if r["reply_message_id"] else "")
        for r in items] or ["no jobs"])
    return 0
