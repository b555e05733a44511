"""The SMTP session layers alone: what each costs per message, without the pipeline.

    .venv/bin/python -m bench.session_layers [--messages 3000] [--rounds 5] [--sessions 20]

Three servers, each its own process, each answering every message with 250 at once:
aiosmtpd's session with ours on top (AgentSMTP, smtp.session = "aiosmtpd"), the native
layer (NativeSession, smtp.session = "native"), and the bare aiosmtpd sink (bench/sink.py,
no enhanced codes, no content step). Both of ours run the real session code: limits,
replies with enhanced codes, the content step (ingress.accept_content: line endings,
dot transparency, Received header); only the pipeline (authentication, scanning, the
store) is left out, so the figures show the ceiling each layer puts on a process. The
load generator (bench/loadgen.py) drives them in alternating rounds, a new connection
per message with MAIL, RCPT and DATA pipelined; figures are medians, and the ratio
native / aiosmtpd is paired per round (a shared machine's speed drifts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run import (Figures, cpu_speed_ms, drive, median_figures,  # noqa: E402
                       wait_for_listening, write_payloads)

RCPT = "inbox@load.bench.test"
MAIL_FROM = "load@sender.bench.test"
LAYERS = ("aiosmtpd", "native")


def serve(layer: str, port: int) -> None:
    """One of our session layers with the real session code and a deliver that says 250."""
    from smtpd_agent.config import SmtpSettings
    from smtpd_agent.record import ReceivedContent
    from smtpd_agent.smtp import replies
    from smtpd_agent.smtp.limits import ConnectionLimits, DataBudget
    from smtpd_agent.smtp.server import AgentSMTP, Sessions
    from smtpd_agent.smtp.session import NativeSession

    class Accept:
        async def handle_MAIL(self, server, session, envelope, address, options) -> str:
            envelope.mail_from = address
            return str(replies.MAIL_OK)

        async def handle_RCPT(self, server, session, envelope, address, options) -> str:
            envelope.rcpt_tos.append(address)
            return str(replies.RCPT_OK)

    async def deliver(content: ReceivedContent) -> replies.Reply:
        return replies.queued(content.envelope.queue_id)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        settings = SmtpSettings()
        limits = ConnectionLimits(10_000, 10_000)
        sessions, budget = Sessions(), DataBudget(settings.data_memory_budget)
        kind = NativeSession if layer == "native" else AgentSMTP
        server = await loop.create_server(
            lambda: kind(Accept(), settings=settings, limits=limits,  # type: ignore[arg-type]
                         deliver=deliver, hostname="layers.bench.test", sessions=sessions,
                         loop=loop, data_budget=budget),
            "127.0.0.1", port)
        bound = server.sockets[0].getsockname()[1]
        print(json.dumps({"event": "sink.listening", "port": bound}), flush=True)
        async with server:
            await server.serve_forever()

    import structlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    asyncio.run(main())


def payloads(count: int, size: int) -> list[bytes]:
    filler = ("The quick brown fox jumps over the lazy dog. " * 2)[:76]
    body = "\r\n".join([filler] * max(1, size // 78))
    return [(f"From: <{MAIL_FROM}>\r\nTo: {RCPT}\r\nSubject: layers {index}\r\n"
             f"Message-ID: <layers-{index}-{time.time_ns()}@sender.bench.test>\r\n\r\n"
             f"{body}\r\n").encode() for index in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve", choices=LAYERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0

    work = Path(tempfile.mkdtemp(prefix="smtpd-agent-layers-"))
    rounds_files = []
    for index in range(args.rounds):
        rounds_files.append(work / f"round{index}.bin")
        write_payloads(payloads(args.messages, args.size), rounds_files[-1])
    warmup = work / "warmup.bin"
    write_payloads(payloads(200, args.size), warmup)
    commands = {f"smtpd-agent {layer}": [sys.executable, "-m", "bench.session_layers",
                                         "--serve", layer] for layer in LAYERS}
    commands["bare aiosmtpd sink"] = [sys.executable, str(REPO / "bench" / "sink.py")]
    processes: dict[str, tuple[subprocess.Popen, int]] = {}
    rounds: dict[str, list[Figures]] = {label: [] for label in commands}
    speeds = []
    try:
        for label, command in commands.items():
            log_path = work / f"{label.replace(' ', '-')}.log"
            with open(log_path, "w") as log:  # port 0: each names the port it bound
                process = subprocess.Popen([*command, "--port", "0"], cwd=REPO, stdout=log)
            port = wait_for_listening(log_path, process, "sink.listening")
            processes[label] = (process, port)
            drive(label, port, process.pid, warmup, args.sessions)
        labels = list(commands)
        for index in range(args.rounds):
            order = labels[index % len(labels):] + labels[:index % len(labels)]
            speeds.append(cpu_speed_ms())
            for label in order:
                process, port = processes[label]
                rounds[label].append(drive(label, port, process.pid, rounds_files[index],
                                           args.sessions))
    finally:
        for process, _ in processes.values():
            process.terminate()
            process.wait(30)
    figures = [median_figures(rows) for rows in rounds.values()]
    ratio = [round(n.messages_per_second / a.messages_per_second, 3)
             for n, a in zip(rounds["smtpd-agent native"], rounds["smtpd-agent aiosmtpd"])]
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "load": {"messages": args.messages, "rounds": args.rounds,
                       "sessions": args.sessions, "size": args.size},
              "cpu_speed_ms_per_round": speeds,
              "results": [asdict(f) for f in figures],
              "native_to_aiosmtpd_per_round": ratio,
              "native_to_aiosmtpd": statistics.median(ratio)}
    print(f"\n{args.rounds} x {args.messages} messages of ~{args.size} bytes, "
          f"{args.sessions} sessions, no pipeline (250 at once)")
    print(f"{'server':<24}{'msg/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU s/1k':>10}{'loop%':>7}"
          "  failures")
    for row in figures:
        print(f"{row.name:<24}{row.messages_per_second:>9}{row.p50_ms:>9}{row.p99_ms:>9}"
              f"{row.cpu_seconds_per_1000:>10}{row.loop_busy_percent:>7}  {row.failures or '-'}")
    print(f"native / aiosmtpd: {report['native_to_aiosmtpd']:.2f} (per round {ratio}); "
          f"machine speed per round (ms, lower is faster): {speeds}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
