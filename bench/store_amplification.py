"""Benchmark: storing one large message for many mailboxes (issue 16, defect 3), before/after.

    .venv/bin/python -m bench.store_amplification [--baseline REV] [--mailboxes 20]
                                                  [--size 3000000] [--messages 3] [--json FILE]

Starts one embedded Postgres (pgserver), then for each target (the --baseline
revision, exported with `git archive`, and this checkout) a child process
that imports that target's smtpd_agent, migrates a fresh database, adds the
mailboxes, and stores --messages distinct messages, each with --size random
bytes attached (base64: ~1.37x on the wire) and addressed to every mailbox,
through the store's own entry point (store_inbound). Per target it reports:
wall time, CPU seconds of the client and of its Postgres backend, WAL bytes
written and database growth, peak RSS of the client and of the backend.
Traffic stays on loopback (a Unix socket).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def child(url: str, mailboxes: int, size: int, messages: int) -> dict[str, Any]:
    """Runs inside the target's tree (PYTHONPATH): measure storing the messages."""
    from smtpd_agent.config import DatabaseSettings
    from smtpd_agent.message import parse_message
    from smtpd_agent.record import Envelope, InboundMessage, Mailbox, Recipient
    from smtpd_agent.store import directory
    from smtpd_agent.store.database import create_pool, migrate
    from smtpd_agent.store.messages import Verdicts, store_inbound

    pool = await create_pool(url, DatabaseSettings(pool_min=1, pool_max=1))
    async with pool.acquire() as connection:
        await migrate(connection)
        backend = await connection.fetchval("SELECT pg_backend_pid()")
    await directory.add_workspace(pool, "acme")
    boxes = []
    for index in range(mailboxes):
        await directory.add_agent(pool, "acme", f"agent{index}")
        agent = await directory.get_agent(pool, "acme", f"agent{index}")
        boxes.append(Mailbox(agent.workspace_id, "acme", agent.id, agent.handle,
                             "acme.agents.test"))
    envelope = Envelope("bench", "127.0.0.1", "client.test", "alice@example.org",
                        tuple(Recipient(box.address, box) for box in boxes))
    built = []
    for number in range(messages):
        attachment = base64.encodebytes(os.urandom(size)).replace(b"\n", b"\r\n")
        raw = (f"From: alice@example.org\r\nTo: all@acme.agents.test\r\n"
               f"Subject: big {number}\r\nMessage-ID: <big{number}@example.org>\r\n"
               "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               "--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\n"
               "Content-Type: application/octet-stream\r\n"
               "Content-Disposition: attachment; filename=data.bin\r\n"
               "Content-Transfer-Encoding: base64\r\n\r\n").encode() + attachment + b"--b--\r\n"
        built.append(InboundMessage(envelope, raw, parse_message(raw)))
    verdicts = Verdicts(spf="none", dkim="none", dmarc="none", scan_status="skipped")

    async with pool.acquire() as connection:
        wal_before = await connection.fetchval("SELECT pg_current_wal_lsn()::text")
        db_before = await connection.fetchval("SELECT pg_database_size(current_database())")
    backend_cpu = _proc_cpu(backend)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    for number, message in enumerate(built):
        stored = await store_inbound(pool, message, verdicts, 30, f"q{number}")
        assert len(stored) == mailboxes
    elapsed = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_SELF)
    backend_cpu = _proc_cpu(backend) - backend_cpu
    async with pool.acquire() as connection:
        await connection.execute("CHECKPOINT")  # TOAST written, sizes settled
        wal = await connection.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)",
                                        wal_before)
        db_growth = await connection.fetchval(
            "SELECT pg_database_size(current_database()) - $1", db_before)
    result = {
        "message_bytes": len(built[0].raw), "messages": messages, "mailboxes": mailboxes,
        "seconds": round(elapsed, 3),
        "client_cpu_s": round(after.ru_utime + after.ru_stime
                              - usage.ru_utime - usage.ru_stime, 3),
        "backend_cpu_s": round(backend_cpu, 3),
        "wal_mb": round(float(wal) / 1e6, 1), "db_growth_mb": round(db_growth / 1e6, 1),
        "client_peak_rss_mb": round(after.ru_maxrss / 1024, 1),
        "backend_peak_rss_mb": round(_proc_peak_rss_kb(backend) / 1024, 1),
    }
    await pool.close()
    return result


def export_tree(rev: str, work: Path) -> Path:
    tree = work / f"tree-{rev}"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REV", help="an earlier revision to compare")
    parser.add_argument("--mailboxes", type=int, default=20)
    parser.add_argument("--size", type=int, default=3_000_000,
                        help="random bytes attached to each message (base64 on the wire)")
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.mailboxes, args.size,
                                           args.messages))))
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    server = pgserver.get_server(work / "pgdata", cleanup_mode="stop")
    targets = []
    if args.baseline:
        targets.append((f"@ {args.baseline}", export_tree(args.baseline, work)))
    targets.append(("this checkout", REPO))
    results = {}
    try:
        for index, (name, tree) in enumerate(targets):
            database = f"bench_{index}"
            server.psql(f"CREATE DATABASE {database};")
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child",
                 server.get_uri(database), "--mailboxes", str(args.mailboxes),
                 "--size", str(args.size), "--messages", str(args.messages)],
                cwd=tree, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name}: {out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.cleanup()
    keys = list(next(iter(results.values())))
    print(f"{'':<26}" + "".join(f"{name:>18}" for name in results))
    for key in keys:
        print(f"{key:<26}" + "".join(f"{r[key]:>18}" for r in results.values()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
