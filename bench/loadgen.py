"""A lean SMTP load generator: N concurrent sessions, a new connection per message.

It speaks raw SMTP over asyncio streams (no client library in the hot path)
so that on a 2-core machine the client costs less CPU than the server it
measures. Latency is measured from the end of DATA (the final dot sent) to
the reply. Run as its own process; it prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def one_message(host: str, port: int, mail_from: str, rcpt: str,
                      payload: bytes) -> tuple[bool, float, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await read_reply(reader)
        writer.write(b"EHLO loadgen.bench.test\r\n")
        await read_reply(reader)
        # PIPELINING, as smtp-source does
        writer.write(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (mail_from.encode(),
                                                                     rcpt.encode()))
        for _ in range(3):
            reply = await read_reply(reader)
        if not reply.startswith(b"354"):
            return False, 0.0, reply
        writer.write(payload)
        start = time.perf_counter()
        await writer.drain()
        reply = await read_reply(reader)
        latency = time.perf_counter() - start
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return reply.startswith(b"250"), latency, reply
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def run(host: str, port: int, sessions: int, payloads: list[bytes], mail_from: str,
              rcpt: str, deadline: float) -> dict:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    latencies: list[float] = []
    failures: dict[str, int] = {}

    async def worker() -> None:
        while not queue.empty() and time.monotonic() < deadline:
            payload = queue.get_nowait()
            try:
                ok, latency, reply = await one_message(host, port, mail_from, rcpt, payload)
            except (ConnectionError, OSError) as error:
                failures[type(error).__name__] = failures.get(type(error).__name__, 0) + 1
                continue
            if ok:
                latencies.append(latency)
            else:
                key = reply[:40].decode("ascii", "replace").strip()
                failures[key] = failures.get(key, 0) + 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    elapsed = time.perf_counter() - began
    return {"accepted": len(latencies), "failures": failures, "seconds": elapsed,
            "latencies": latencies}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--payloads", required=True, help="file of length-prefixed payloads")
    parser.add_argument("--mail-from", required=True)
    parser.add_argument("--rcpt", required=True)
    parser.add_argument("--max-seconds", type=float, default=120)
    args = parser.parse_args()
    payloads = []
    with open(args.payloads, "rb") as handle:
        data = handle.read()
    offset = 0
    while offset < len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        payloads.append(data[offset + 4:offset + 4 + size])
        offset += 4 + size
    result = asyncio.run(run("127.0.0.1", args.port, args.sessions, payloads, args.mail_from,
                             args.rcpt, time.monotonic() + args.max_seconds))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
