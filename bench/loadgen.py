"""A lean SMTP load generator: N concurrent sessions, a new connection per message.

It speaks raw SMTP over asyncio streams (tests.support.smtp_send, no client library)
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import smtp_send  # noqa: E402


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
            timings: dict[str, float] = {}
            code, reply = await smtp_send(port, payload, mail_from, [rcpt], timings=timings,
                                          pipelining=True)
            if code == 250:
                latencies.append(timings["data"])
            else:
                key = reply[:40].decode("ascii", "replace").strip() or str(code)
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
