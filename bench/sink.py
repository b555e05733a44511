"""The reference: a bare aiosmtpd server that accepts everything and stores nothing."""

from __future__ import annotations

import argparse
import asyncio
import json

from aiosmtpd.smtp import SMTP


class Accept:
    async def handle_DATA(self, server, session, envelope) -> str:
        return "250 2.0.0 OK"


async def serve(port: int) -> None:
    """Port 0 binds a free port; the JSON line on stdout names it (bench/run.py reads it)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Accept(), enable_SMTPUTF8=True,
                                                   hostname="sink.bench.test"),
                                      "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"event": "sink.listening", "port": bound}), flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))
