"""Held replies (issue 16, defect 5): one client pipelines NOOPs whose writes end mid-line.

    .venv/bin/python -m bench.hostile_smtp [--megabytes 37] [--baseline REV] [--json FILE]
                                           [--max-commands N]

Runs `smtpd-agent serve` (embedded Postgres unless DATABASE_URL is given) from
this tree, and with --baseline from an earlier git revision too, and against
each sends `--megabytes` of "NOOP\\r\\n" lines in 64 KB writes that each end in
the middle of a line, so the server always has input buffered. Reports, per
server: seconds to send it all, the server's CPU seconds and peak RSS growth
over its idle RSS, the reply bytes written back meanwhile, and the slowest NOOP
round trip of a second session paced with the attack. A well-behaved client
sends one message at the end; its reply code and seconds are reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from bench.run import REPO, Server, baseline_tree
from tests.support import smtp_send

RCPT = "inbox@load.bench.test"


@dataclass
class Result:
    name: str
    seconds: float
    cpu_seconds: float
    idle_rss_mb: float
    peak_rss_mb: float
    rss_growth_mb: float
    replied_bytes: int
    closed_by_server: str
    slowest_neighbour_noop_seconds: float
    neighbour_code: int
    neighbour_seconds: float


class Sampler:
    """Peak RSS of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line or line[3:4] != b"-":
            return line


async def attack(port: int, megabytes: int) -> tuple[float, int, str, float]:
    """Send the NOOPs; return seconds, reply bytes received, how it ended, and the
    slowest NOOP round trip of a second, well-behaved session meanwhile."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    probe_reader, probe_writer = await asyncio.open_connection("127.0.0.1", port)
    for stream_reader, stream_writer in ((reader, writer), (probe_reader, probe_writer)):
        await read_reply(stream_reader)
        stream_writer.write(b"EHLO client.example\r\n")
        await read_reply(stream_reader)
    replied = 0
    closed = ""

    async def drain_replies() -> None:
        nonlocal replied, closed
        while chunk := await reader.read(65536):
            replied += len(chunk)
            if b"421" in chunk:
                closed = chunk[chunk.find(b"421"):].split(b"\r\n")[0].decode()
        closed = closed or "eof"

    reading = asyncio.create_task(drain_replies())
    # Every write ends inside a NOOP and fits one read; after each, a NOOP on the other
    # session comes back only once the server's loop has taken the write in, so its
    # input never ends at a line end (as a client pacing its writes to the server's).
    write = b"OP\r\n" + b"NOOP\r\n" * 9_998 + b"NO"
    writer.write(b"NO")
    started = time.perf_counter()
    sent = 0
    slowest = 0.0
    try:
        while sent < megabytes * 1_000_000 and not reading.done():
            writer.write(write)
            await writer.drain()
            sent += len(write)
            probe_started = time.perf_counter()
            probe_writer.write(b"NOOP\r\n")
            await read_reply(probe_reader)
            slowest = max(slowest, time.perf_counter() - probe_started)
    except ConnectionError:
        pass
    seconds = time.perf_counter() - started
    await asyncio.sleep(1)
    for stream_writer in (writer, probe_writer):
        stream_writer.close()
    try:
        await asyncio.wait_for(reading, 5)
    except (asyncio.TimeoutError, ConnectionError):
        pass
    return seconds, replied, closed or "open", slowest


def measure(server: Server, megabytes: int) -> Result:
    process = psutil.Process(server.pid)
    time.sleep(1)
    idle = process.memory_info().rss
    cpu_before = sum(process.cpu_times()[:2])
    with Sampler(server.pid) as sampler:
        seconds, replied, closed, slowest = asyncio.run(attack(server.port, megabytes))
        payload = b"Subject: after\r\nMessage-ID: <after@bench.test>\r\n\r\nhi\r\n"
        started = time.perf_counter()
        code, _ = asyncio.run(smtp_send(server.port, payload, "a@bench.test", [RCPT],
                                        timeout=60))
        neighbour = time.perf_counter() - started
    cpu = sum(process.cpu_times()[:2]) - cpu_before
    return Result(server.label, round(seconds, 2), round(cpu, 2), round(idle / 2**20, 1),
                  round(sampler.peak / 2**20, 1), round((sampler.peak - idle) / 2**20, 1),
                  replied, closed, round(slowest, 3), code, round(neighbour, 3))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=37)
    parser.add_argument("--baseline", metavar="REV", help="also measure git revision REV")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--max-commands", type=int,
                        help="smtp.max_commands for this tree (e.g. 10**9: the reply cap alone)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smtpd-agent-hostile-"))
    env = {**os.environ, "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": "bench.test",
           "SMTPD_AGENT_AGENT_WORKERS": "0",
           # info: run.Server reads the port serve bound from the server.listening line
           "SMTPD_AGENT_LOG_LEVEL": "info",
           "SMTPD_AGENT_SCAN_CLAMD": "", "SMTPD_AGENT_DNS_NAMESERVERS": "127.0.0.1:9",
           "SMTPD_AGENT_DNS_TIMEOUT": "0.5", "SMTPD_AGENT_AUTH_TIMEOUT": "1"}
    if args.max_commands:  # an older tree ignores the variable (unknown keys are not read)
        env["SMTPD_AGENT_SMTP_MAX_COMMANDS"] = str(args.max_commands)
    trees = [("this tree", REPO)]
    baseline = None
    if args.baseline:
        baseline = baseline_tree(args.baseline, work)
        trees.insert(0, (f"@ {args.baseline}", baseline))
    results = []
    try:
        for index, (label, code) in enumerate(trees):
            server = Server(label, code, env, work / f"state-{index}", None)
            server.start()
            try:
                results.append(measure(server, args.megabytes))
            finally:
                server.stop()
    finally:
        if baseline:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO,
                           capture_output=True)
    for result in results:
        print(json.dumps(asdict(result)))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
