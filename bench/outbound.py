"""Outbound throughput: N agent replies queued at once, drained through a loopback relay sink.

    .venv/bin/python -m bench.outbound [N] [WORKERS]

Measures DKIM signing alone (RSA-2048 + Ed25519 per message) and the whole path: sweep,
claim (SKIP LOCKED), sign, SMTP to the sink over one reused connection per worker, record.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from smtpd_agent.domains.keys import SigningKey, generate
from smtpd_agent.outbound.signing import sign_message
from tests.outbound.conftest import RelaySink, make_agent, reply_bytes, store_reply
from tests.support import EmbeddedCluster, LoopbackController, ServerThread, make_settings


def bench_signing(count: int = 200) -> float:
    keys = [SigningKey("agents.test", "s-rsa", "rsa-2048", generate("rsa-2048")[0]),
            SigningKey("agents.test", "s-ed", "ed25519", generate("ed25519")[0])]
    raw = reply_bytes("bob@example.org")
    began = time.perf_counter()
    for _ in range(count):
        sign_message(raw, keys)
    return (time.perf_counter() - began) / count * 1000


async def bench_drain(root: Path, count: int, workers: int) -> tuple[float, int]:
    cluster = EmbeddedCluster(root / "pg")
    sink = RelaySink()
    controller = LoopbackController(sink)
    controller.start()
    port = controller.port
    url = await cluster.new_database()
    servers = []
    try:
        for index in range(workers):
            settings = make_settings(url, root / f"state{index}", **{
                "outbound.relay": f"smtp://127.0.0.1:{port}?tls=none",
                "outbound.poll_interval": 0.05, "outbound.batch_size": 20,
                "outbound.concurrency": int(sys.argv[3]) if len(sys.argv) > 3 else 4,
                "domains.key_file": str(root / "dkim.secret"), "log.level": "warning"})
            servers.append(ServerThread(settings).start())
        db = await asyncpg.connect(url)
        agent = await make_agent(db)
        async with db.transaction():
            for index in range(count):
                await store_reply(db, agent, f"r{index}@example.org")
        began = time.perf_counter()
        while await db.fetchval("SELECT count(*) FROM deliveries WHERE status = 'sent'") < count:
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - began
        await db.close()
        return count / elapsed, len(sink.received)
    finally:
        for server in servers:
            server.stop()
        controller.stop()
        cluster.stop()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    print(f"sign (RSA-2048 + Ed25519): {bench_signing():.2f} ms/message")
    with tempfile.TemporaryDirectory(prefix="outbound-bench-") as root:
        rate, received = asyncio.run(bench_drain(Path(root), count, workers))
    print(f"drain {count} replies, {workers} worker(s): {rate:.0f} messages/s "
          f"(relay received {received})")


if __name__ == "__main__":
    main()
