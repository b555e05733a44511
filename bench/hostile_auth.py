"""Hostile input to the authenticate stage (issue 16, defects 1 and 2): time, CPU, peak RSS.

    .venv/bin/python -m bench.hostile_auth [--before DIR] [--cap SECONDS] [--json FILE]

Each case runs in a child process watched from here (wall clock, CPU seconds
from /proc/<pid>/stat, peak RSS from VmHWM), so work that goes on after the
stage has answered is counted too, and a case that would run for minutes is
stopped at --cap seconds and reported as such. Columns: answered_s, from the
case's start to the stage's answer; busy_s, until the child's CPU went idle
(1 s without use); cpu_s, CPU seconds over that span; peak_rss_mb and the RSS
the child had when the case started (interpreter and imports). The loopback DNS test server
runs here, in the parent, so the child's CPU load cannot slow the DNS answers.

Cases:
- ar-80k / ar-254k: one Authentication-Results field of N "(" then N ")" then
  an authserv-id, through `strip_our_results` (what the pipeline runs on the
  event loop for every message).
- dkim: 6 messages at once, each a 2 MB body with 2,400 minimal DKIM signatures
  whose key exists (so each would hash the body), through `authenticate()` with
  the default settings; 0.5 s later a benign message from a domain with SPF and
  DMARC p=reject. Reported: when the hostile ones were answered, when the CPU
  went idle, and the benign message's verdicts and latency (it used to queue
  behind DKIM for SPF's thread, time out, and pass as temperror).

--before DIR runs every case also against another checkout's `smtpd_agent`
(e.g. `git archive <rev> smtpd_agent | tar -x -C DIR`), in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUTHSERV = "mx.bench.example"
CASES = ("ar-80k", "ar-254k", "dkim")


# -- the child: one case, in the code under test ---------------------------------------------

def _ar_case(size: int) -> dict[str, object]:
    from smtpd_agent.auth.results import strip_our_results

    n = size // 2
    raw = (b"Authentication-Results: " + b"(" * n + b")" * n + b" " + AUTHSERV.encode()
           + b"; dkim=pass\r\nFrom: a@b.example\r\n\r\nbody\r\n")
    began = time.perf_counter()
    stripped = strip_our_results(raw, AUTHSERV)
    return {"seconds": round(time.perf_counter() - began, 4),
            "field_removed": not stripped.startswith(b"Authentication-Results")}


def _hostile_message(signatures: int, body_bytes: int) -> bytes:
    bogus = base64.b64encode(b"\0" * 32).decode()
    sig = (f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=attacker.example; "
           f"s=sel; h=from; bh={bogus}; b={bogus}\r\n").encode()
    line = b"x" * 998 + b"\r\n"
    body = line * (body_bytes // len(line))
    return (sig * signatures + b"From: a@attacker.example\r\nTo: b@mx.bench.example\r\n"
            b"Subject: hostile\r\nMessage-ID: <h@attacker.example>\r\n\r\n" + body)


async def _dkim_case(nameserver: str, hostile: int, signatures: int,
                     body_bytes: int) -> dict[str, object]:
    from smtpd_agent.auth import authenticate, decide
    from smtpd_agent.config import AuthSettings, DnsSettings
    from smtpd_agent.dns import Resolver
    from smtpd_agent.message import parse_message
    from smtpd_agent.record import Envelope, InboundMessage

    try:  # the runtime's start-up step, where it exists
        from smtpd_agent.auth import adapters
        adapters.install()
    except ImportError:
        pass

    def inbound(raw: bytes, mail_from: str, client_ip: str) -> InboundMessage:
        envelope = Envelope(session_id="bench", client_ip=client_ip, helo="mail.example",
                            mail_from=mail_from, recipients=())
        return InboundMessage(envelope=envelope, raw=raw, parsed=parse_message(raw))

    resolver = Resolver(DnsSettings(nameservers=[nameserver], timeout=2.0, cache_size=1000))
    settings = AuthSettings(authserv_id=AUTHSERV)
    raw = _hostile_message(signatures, body_bytes)
    began = time.perf_counter()
    answered: list[float] = []
    hostile_tasks = [asyncio.create_task(authenticate(
        inbound(raw, f"h{i}@attacker.example", "198.51.100.9"), resolver, settings, AUTHSERV))
        for i in range(hostile)]
    for task in hostile_tasks:
        task.add_done_callback(lambda _: answered.append(time.perf_counter() - began))
    await asyncio.sleep(0.5)
    benign_raw = (b"From: Alice <alice@good.example>\r\nTo: b@mx.bench.example\r\n"
                  b"Subject: hi\r\nMessage-ID: <g@good.example>\r\n\r\nHello.\r\n")
    benign_began = time.perf_counter()
    benign = await authenticate(inbound(benign_raw, "alice@good.example", "192.0.2.10"),
                                resolver, settings, AUTHSERV)
    benign_seconds = time.perf_counter() - benign_began
    results = await asyncio.gather(*hostile_tasks)
    return {
        "hostile_answered_after_s": round(max(answered), 2),
        "hostile_dkim": results[0].dkim,
        "hostile_signatures_reported": len(results[0].dkim_signatures),
        "benign_seconds": round(benign_seconds, 3),
        "benign": f"spf={benign.spf} dmarc={benign.dmarc} -> {decide(benign, settings).action}",
    }


def child(args: argparse.Namespace) -> None:
    if args.code:
        # That checkout's smtpd_agent, ahead of this one (cwd) and of the editable install.
        sys.path.insert(0, args.code)
        sys.meta_path[:] = [f for f in sys.meta_path
                            if "__editable__" not in getattr(f, "__module__", "")]
    import smtpd_agent
    import smtpd_agent.auth  # noqa: F401 - imports done before the clock starts
    print("READY", flush=True)
    if args.case.startswith("ar-"):
        result = _ar_case(int(args.case[3:-1]) * 1000)
    else:
        result = asyncio.run(_dkim_case(args.nameserver, args.hostile, args.signatures,
                                        args.body))
    result["code_path"] = str(Path(smtpd_agent.__file__).parent)
    print("RESULT " + json.dumps(result), flush=True)
    time.sleep(3600)  # the parent ends this process once its CPU has gone idle


# -- the parent: DNS, watching, the table --------------------------------------------------

def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def run_case(case: str, code: Path | None, nameserver: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    command = [sys.executable, "-m", "bench.hostile_auth", "--child", case,
               "--code", str(code or ""),
               "--nameserver", nameserver, "--hostile", str(args.hostile),
               "--signatures", str(args.signatures), "--body", str(args.body)]
    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE)
    os.set_blocking(process.stdout.fileno(), False)
    output, ready, answered, idle_since, last_cpu = "", None, None, None, -1.0
    cpu = peak = cpu_at_ready = rss_at_ready = 0.0
    stopped = False
    while process.poll() is None:
        time.sleep(0.1)
        now = time.perf_counter() - began
        try:
            output += os.read(process.stdout.fileno(), 1 << 16).decode()
        except BlockingIOError:
            pass
        cpu, peak = _cpu_seconds(process.pid), _peak_rss_mb(process.pid)
        if ready is None and "READY" in output:
            ready, cpu_at_ready, rss_at_ready = now, cpu, peak
        if answered is None and "RESULT " in output:
            answered = now
        if answered is not None:
            if cpu - last_cpu > 0.02:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            if idle_since is not None and now - idle_since >= 1.0:
                break
        last_cpu = cpu
        if now > args.cap:
            stopped = True
            break
    wall = time.perf_counter() - began
    process.kill()
    process.wait()
    result: dict = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
    start = ready or 0.0
    return {"case": case, "code": "before" if code else "after",
            "answered_s": round((wall if answered is None else answered) - start, 2),
            "busy_s": round((wall if stopped or idle_since is None else idle_since) - start, 2),
            "cpu_s": round(cpu - cpu_at_ready, 2), "peak_rss_mb": peak,
            "rss_at_start_mb": rss_at_ready, "stopped_at_cap": stopped, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="another checkout's code (its parent dir)")
    parser.add_argument("--cap", type=float, default=90.0, help="seconds per case at most")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--hostile", type=int, default=6)
    parser.add_argument("--signatures", type=int, default=2400)
    parser.add_argument("--body", type=int, default=2_000_000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--nameserver", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.case = args.child
        child(args)
        return

    sys.path.insert(0, str(ROOT))
    from tests.auth.keys import rsa_key
    from tests.dnsserver import DnsTestServer

    key = rsa_key(2048)
    rows = []
    with DnsTestServer() as dns:
        dns.txt("sel._domainkey.attacker.example", key.record)
        dns.txt("attacker.example", "v=spf1 -all")
        dns.txt("good.example", "v=spf1 ip4:192.0.2.10 -all")
        dns.txt("_dmarc.good.example", "v=DMARC1; p=reject")
        for case in args.cases.split(","):
            for code in ([args.before] if args.before else []) + [None]:
                row = run_case(case, code, dns.nameserver, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    header = ("case", "code", "answered_s", "busy_s", "cpu_s", "peak_rss_mb",
              "rss_at_start_mb", "stopped_at_cap")
    print()
    print(" | ".join(header) + " | notes")
    for row in rows:
        notes = {k: v for k, v in row.items() if k not in header and k != "code_path"}
        print(" | ".join(str(row.get(h, "")) for h in header) + " | "
              + ", ".join(f"{k}={v}" for k, v in notes.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
