"""Postgres CPU per message of the store alone: the group commit, without SMTP.

    .venv/bin/python -m bench.store_cost [--messages 2000] [--concurrency 20]
                                         [--size 5000] [--rounds 3] [--variant SQL]...

The full benchmark (bench/run.py) reports Postgres CPU per 1,000 messages beside the
server's, but on a 2-core machine both move with everything else that runs. This
stores the same kind of message (bench/run.py's, with its extracted text set as the
pipeline sets it) through store/messages.GroupCommit into an embedded Postgres of its
own, `--concurrency` at a time, and reads the CPU seconds of every Postgres process
(psutil) before and after: Postgres's cost per message, and nothing else's. Then it
runs the search indexer (store/search.py) over the round's messages and reports its
Postgres CPU apart: work done after the COMMIT, not in it.

`--variant NAME=SQL` measures again after running SQL on the same database (an
ablation: how much of the cost one thing is), e.g.
`--variant "no search=ALTER TABLE messages DROP COLUMN search"`. Variants run after
the plain rounds, in the order given, each on top of the previous.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.run import postgres_cpu
from smtpd_agent.config import DatabaseSettings
from smtpd_agent.message import parse_message
from smtpd_agent.record import Envelope, InboundMessage, Mailbox, Recipient
from smtpd_agent.store import directory, search
from smtpd_agent.store.database import EmbeddedPostgres, create_pool, migrate
from smtpd_agent.store.events import EVENTS_CHANNEL
from smtpd_agent.store.messages import GroupCommit, Verdicts

DOMAIN = "load.bench.test"
VERDICTS = Verdicts(spf="pass", dkim="pass", dmarc="pass", arc="none", scan_status="clean",
                    auth_detail={"spf": "pass", "dkim": "pass", "dmarc": "pass"})
FILLER = ("The quick brown fox jumps over the lazy dog. " * 2)[:76]


def message(index: int, size: int, mailbox: Mailbox) -> InboundMessage:
    body = "\r\n".join([FILLER] * max(1, size // 78))
    raw = (f"From: Load <sender@example.org>\r\nTo: {mailbox.address}\r\n"
           f"Subject: load {index}\r\nDate: Sat, 21 Nov 2026 05:00:00 +0000\r\n"
           f"Message-ID: <store-{index}-{time.time_ns()}@example.org>\r\n\r\n{body}\r\n").encode()
    envelope = Envelope(f"s{index}", "127.0.0.1", "client.test", "sender@example.org",
                        (Recipient(mailbox.address, mailbox),))
    parsed = parse_message(raw)
    return InboundMessage(envelope, raw, parsed, extracted_text=parsed.text_body.strip())


async def store_round(store: GroupCommit, mailbox: Mailbox, start: int, count: int, size: int,
                      concurrency: int, postmaster: int) -> dict[str, float]:
    messages = [message(start + i, size, mailbox) for i in range(count)]
    gate = asyncio.Semaphore(concurrency)

    async def one(item: InboundMessage) -> None:
        async with gate:
            await store.store(item, VERDICTS, item.envelope.session_id)

    cpu = postgres_cpu(postmaster)
    began = time.perf_counter()
    await asyncio.gather(*(one(item) for item in messages))
    seconds = time.perf_counter() - began
    used = postgres_cpu(postmaster) - cpu
    # then what the search indexer spends on the same messages, after their COMMIT
    cpu = postgres_cpu(postmaster)
    indexed = 0
    if await store.db.fetchval("SELECT to_regclass('search_queue') IS NOT NULL"):
        while taken := await search.index_pending(store.db, 500):
            indexed += taken
    indexing = postgres_cpu(postmaster) - cpu
    return {"messages_per_second": round(count / seconds, 1),
            "postgres_cpu_seconds_per_1000": round(used / count * 1000, 3),
            "indexed": indexed,
            "indexing_cpu_seconds_per_1000": round(indexing / count * 1000, 3)}


async def run(args: argparse.Namespace, work: Path) -> dict:
    embedded = EmbeddedPostgres.start(work)
    postmaster = int((embedded.pgdata / "postmaster.pid").read_text().split()[0])
    pool = await create_pool(embedded.url, DatabaseSettings(pool_max=8))
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
        await directory.add_workspace(pool, "load")
        await directory.add_agent(pool, "load", "bench", auto_reply=False)
        agent = await directory.get_agent(pool, "load", "bench")
        mailbox = Mailbox(agent.workspace_id, "load", agent.id, "bench", DOMAIN, auto_reply=False)
        store = GroupCommit(pool, 30, batch_max=64, committers=2)
        # as many LISTEN connections as `serve` processes: each commit's NOTIFY wakes them
        listeners = [await asyncpg.connect(embedded.url) for _ in range(args.listeners)]
        heard = [0]
        for listener in listeners:
            await listener.add_listener(EVENTS_CHANNEL,
                                        lambda *_: heard.__setitem__(0, heard[0] + 1))
        report: dict = {"load": vars(args) | {"variant": None}, "results": {}}
        plans = [("as stored today", None)] + [tuple(v.split("=", 1)) for v in args.variant]
        sent = 0
        for name, sql in plans:
            if sql:
                async with pool.acquire() as connection:
                    await connection.execute(sql)
            rounds = []
            for _ in range(args.rounds):
                rounds.append(await store_round(store, mailbox, sent, args.messages, args.size,
                                                args.concurrency, postmaster))
                sent += args.messages
            report["results"][name] = {
                "rounds": rounds,
                "postgres_cpu_seconds_per_1000": statistics.median(
                    r["postgres_cpu_seconds_per_1000"] for r in rounds),
                "messages_per_second": statistics.median(r["messages_per_second"] for r in rounds),
                "indexing_cpu_seconds_per_1000": statistics.median(
                    r["indexing_cpu_seconds_per_1000"] for r in rounds)}
            report["results"][name]["sequential_scans"] = [dict(r) for r in await pool.fetch(
                """SELECT relname, seq_scan, seq_tup_read, idx_scan FROM pg_stat_user_tables
                    WHERE seq_tup_read > 0 ORDER BY seq_tup_read DESC LIMIT 5""")]
            report["results"][name]["index_reads"] = [dict(r) for r in await pool.fetch(
                """SELECT indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes
                    WHERE idx_tup_read > 0 ORDER BY idx_tup_read DESC LIMIT 5""")]
            result = report["results"][name]
            print(f"{name:30} store: PG CPU s/1k {result['postgres_cpu_seconds_per_1000']:6.3f}"
                  f"  msg/s {result['messages_per_second']:7.1f};  search indexing after: "
                  f"PG CPU s/1k {result['indexing_cpu_seconds_per_1000']:6.3f}", flush=True)
        report["notifications_heard"] = heard[0]
        for listener in listeners:
            await listener.close()
        return report
    finally:
        await pool.close()
        embedded.release()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", type=int, default=5000, help="approximate message bytes")
    parser.add_argument("--listeners", type=int, default=0,
                        help="connections LISTENing to the events channel, as serve's")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SQL")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for variant in args.variant:
        if "=" not in variant:
            parser.error(f"--variant {variant!r}: expected NAME=SQL")
    with tempfile.TemporaryDirectory(prefix="smtpd-agent-store-cost-") as work:
        report = asyncio.run(run(args, Path(work)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
