"""Benchmark: the full pipeline against a bare aiosmtpd sink, in one run, on loopback.

    .venv/bin/python -m bench.run [--messages 2000] [--rounds 3] [--sessions 20]
                                  [--size 5000] [--attachment] [--processes N]
                                  [--json FILE] [--profile DIR] [--baseline REV]
                                  [--session-layer aiosmtpd|native|both]

Starts everything the server needs (embedded Postgres unless DATABASE_URL is
given, the loopback DNS test server publishing SPF, DKIM and DMARC for the
sending domain, a real clamd when clamav-daemon is installed), runs
`smtpd-agent serve` as a subprocess beside a bare aiosmtpd sink (and with
--baseline an earlier git revision too), and drives each with the lean load
generator (bench/loadgen.py) sending DKIM-signed messages, a new connection
per message. The targets are measured in alternating rounds, each round with
new messages, and the figures are medians: a shared machine's speed drifts
by tens of percent within a minute (the report says how much, per round).
Prints a table and writes JSON. Traffic stays on 127.0.0.1.

When Postfix is installed (and we run as root), a private Postfix instance is a
target too (bench/postfix.py: its own configuration, queue and data directories under
the work directory, every service unchrooted, one smtpd on loopback, the mail taken into
its fsync'd queue and held there with `check_recipient_access static:HOLD`), measured in
the same alternating rounds, with the ratio ours/Postfix per round like the sink's.
Install it with `DEBIAN_FRONTEND=noninteractive apt-get install -y postfix`.

A second table splits the machine's CPU per message (every process and the kernel,
from /proc/stat) into the target's own processes, its Postgres, clamd, the load
generator and the rest (the kernel's loopback TCP, the Postgres WAL writer's
neighbours, anything else running): a ratio of messages per second says how far
apart two targets are, this says where each one's time goes.

After each round of ours the benchmark waits until every message of the round is
searchable and reports how long that took and what it cost Postgres: the search
indexer yields to a burst of mail (store.search_max_delay), so part of its work
comes after the round's last reply, and it must not run into the next target's
round. The messages per second are those of the burst; the indexing is still paid.

Postfix's smtp-source is not used even when installed: it sends one -F file
for every message, which our deduplication would store once, and it does not
time the end of DATA to the reply.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import asyncpg
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.postfix import PrivatePostfix, find_postfix  # noqa: E402
from smtpd_agent.auth import adapters  # noqa: E402
from smtpd_agent.store.database import EMBEDDED_DATABASE  # noqa: E402
from tests.auth.keys import rsa_key, sign  # noqa: E402
from tests.clamd import Clamd, find_clamd  # noqa: E402
from tests.dnsserver import DnsTestServer  # noqa: E402
from tests.ports import (  # noqa: E402
    PortTaken,
    probe_port,
    start_on_probed_port,
    wait_until_listening,
)

DOMAIN = "bench.test"
SENDER_DOMAIN = "sender.bench.test"
RCPT = f"inbox@load.{DOMAIN}"
MAIL_FROM = f"load@{SENDER_DOMAIN}"
WARMUP = 100  # messages sent to each target before the rounds, not measured
NATIVE = "smtpd-agent (native)"  # the label of the native session layer with --session-layer both


@dataclass
class Figures:
    name: str
    accepted: int
    seconds: float
    messages_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    peak_rss_mb: float
    cpu_seconds_per_1000: float
    postgres_cpu_seconds_per_1000: float = 0.0
    machine_busy_percent: float = 0.0
    loop_busy_percent: float = 0.0
    # Where the machine's CPU went: every process and the kernel, per message; and the
    # shares of clamd (a real one, when the pipeline scans) and of the load generator.
    machine_cpu_ms_per_message: float = 0.0
    clamd_cpu_seconds_per_1000: float = 0.0
    client_cpu_seconds_per_1000: float = 0.0
    failures: dict = field(default_factory=dict)


def wait_for_listening(log_path: Path, process: subprocess.Popen, event: str,
                       seconds: float = 90) -> int:
    """The port in the JSON log line `event` (`server.listening`, `sink.listening`): servers
    bind port 0 and name the port they got, so no port is probed free and lost before use."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        exited = process.poll() is not None
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                logged = json.loads(line)
            except ValueError:
                continue
            if isinstance(logged, dict) and logged.get("event") == event:
                return int(logged["port"])
        if exited:
            raise RuntimeError(f"process exited with {process.returncode}")
        time.sleep(0.1)
    raise RuntimeError(f"no {event} in {log_path} within {seconds}s")


def make_payloads(count: int, size: int, attachment: bool, key) -> list[bytes]:
    """DKIM-signed messages of about `size` bytes, dot-stuffed for DATA."""
    adapters.install()  # RSA signing through OpenSSL: dkimpy's own is pure Python, ~100x slower
    filler = ("The quick brown fox jumps over the lazy dog. " * 2)[:76]
    payloads = []
    for index in range(count):
        head = (f"From: Load <{MAIL_FROM}>\r\nTo: {RCPT}\r\nSubject: load {index}\r\n"
                f"Date: Sat, 21 Nov 2026 05:00:00 +0000\r\n"
                f"Message-ID: <load-{index}-{time.time_ns()}@{SENDER_DOMAIN}>\r\n")
        if attachment:
            blob = base64.encodebytes(os.urandom(max(size // 2, 100))).replace(b"\n", b"\r\n")
            body_text = "\r\n".join([filler] * max(1, size // 2 // 78))
            raw = (head + "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                   f"--b\r\nContent-Type: text/plain\r\n\r\n{body_text}\r\n--b\r\n"
                   "Content-Type: application/pdf; name=doc.pdf\r\n"
                   "Content-Disposition: attachment; filename=doc.pdf\r\n"
                   "Content-Transfer-Encoding: base64\r\n\r\n").encode() + blob + b"--b--\r\n"
        else:
            body_text = "\r\n".join([filler] * max(1, size // 78))
            raw = (head + "\r\n" + body_text + "\r\n").encode()
        signed = sign(raw, key, SENDER_DOMAIN)
        payloads.append(signed.replace(b"\r\n.", b"\r\n.."))
    return payloads


def write_payloads(payloads: list[bytes], path: Path) -> None:
    with open(path, "wb") as handle:
        for payload in payloads:
            handle.write(len(payload).to_bytes(4, "big") + payload)


class Sampler:
    """Peak RSS and CPU of a server process and its children (smtp.processes > 1)."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.process, *self.process.children(recursive=True)]
        except psutil.Error:
            return []

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, sum(p.memory_info().rss for p in self.tree()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    def cpu(self) -> float:
        """CPU seconds of the tree, including its processes that have ended and been
        waited for (Postfix's smtpd and cleanup come and go: counted on the live ones
        alone, the figure fell when one ended)."""
        total = 0.0
        for process in self.tree():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system + times.children_user + times.children_system
        return total

    def loop_cpu(self) -> float:
        """CPU seconds of the main (event loop) thread of the top process."""
        try:
            main = next(t for t in self.process.threads() if t.id == self.process.pid)
        except (psutil.Error, StopIteration):
            return 0.0
        return main.user_time + main.system_time

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def process_cpu(pid: int | None) -> float:
    """CPU seconds of one process (0 when there is none, or it has gone)."""
    if pid is None:
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def children_cpu() -> float:
    """CPU seconds of this process's children that have ended and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def postgres_cpu(postmaster: int | None = None) -> float:
    """CPU seconds of one Postgres (the postmaster `postmaster` and its children), or of
    every process named postgres when None (a DATABASE_URL the bench did not start). One
    target's figure must not count another's Postgres, nor a test suite's running beside."""
    if postmaster is None:
        processes = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]
    else:
        try:
            root = psutil.Process(postmaster)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:  # a backend that ended meanwhile
            continue
        total += times.user + times.system
    return total


def drive(name: str, port: int, pid: int, payload_file: Path, sessions: int,
          postmaster: int | None = None, uses_postgres: bool = True,
          clamd: int | None = None) -> Figures:
    machine_before = psutil.cpu_times()
    measure_postgres = (lambda: postgres_cpu(postmaster)) if uses_postgres else (lambda: 0.0)
    postgres_before = measure_postgres()
    clamd_before, client_before = process_cpu(clamd), children_cpu()
    with Sampler(pid) as sampler:
        cpu_before, loop_before = sampler.cpu(), sampler.loop_cpu()
        # the load generator is the only child that ends (and is waited for) meanwhile
        result = subprocess.run(
            [sys.executable, str(REPO / "bench" / "loadgen.py"), "--port", str(port),
             "--sessions", str(sessions), "--payloads", str(payload_file),
             "--mail-from", MAIL_FROM, "--rcpt", RCPT],
            capture_output=True, text=True, timeout=600, check=True)
        cpu, loop = sampler.cpu() - cpu_before, sampler.loop_cpu() - loop_before
    postgres = measure_postgres() - postgres_before
    clamd_cpu, client = process_cpu(clamd) - clamd_before, children_cpu() - client_before
    machine_after = psutil.cpu_times()
    busy = sum(machine_after) - sum(machine_before)
    idle = (machine_after.idle + machine_after.iowait) - (machine_before.idle + machine_before.iowait)
    data = json.loads(result.stdout)
    latencies = sorted(data["latencies"])
    accepted = data["accepted"]

    def pct(p: float) -> float:
        if not latencies:
            return 0.0
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return Figures(
        name=name, accepted=accepted, seconds=round(data["seconds"], 3),
        messages_per_second=round(accepted / data["seconds"], 1) if data["seconds"] else 0.0,
        p50_ms=round(statistics.median(latencies) * 1000, 2) if latencies else 0.0,
        p95_ms=pct(0.95), p99_ms=pct(0.99), peak_rss_mb=round(sampler.peak / 2**20, 1),
        cpu_seconds_per_1000=round(cpu / accepted * 1000, 3) if accepted else 0.0,
        postgres_cpu_seconds_per_1000=round(postgres / accepted * 1000, 3) if accepted else 0.0,
        machine_busy_percent=round(100 * (1 - idle / busy), 1) if busy else 0.0,
        loop_busy_percent=round(100 * loop / data["seconds"], 1) if data["seconds"] else 0.0,
        machine_cpu_ms_per_message=round((busy - idle) / accepted * 1000, 3) if accepted else 0.0,
        clamd_cpu_seconds_per_1000=round(clamd_cpu / accepted * 1000, 3) if accepted else 0.0,
        client_cpu_seconds_per_1000=round(client / accepted * 1000, 3) if accepted else 0.0,
        failures=data["failures"])


class Target:
    """Something the load generator drives: `smtpd-agent serve` from a tree, or the sink."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.port = 0
        self.pid = 0
        self.process: subprocess.Popen | None = None
        # the target's own Postgres: its postmaster's pid (None: every postgres process)
        self.postmaster: int | None = None
        self.uses_postgres = False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


class Sink(Target):
    def start(self) -> None:
        log_path = Path(tempfile.mkdtemp(prefix="smtpd-agent-sink-")) / "sink.log"
        with open(log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, str(REPO / "bench" / "sink.py")],
                                            cwd=REPO, stdout=log)
        self.port = wait_for_listening(log_path, self.process, "sink.listening")
        self.pid = self.process.pid


class Postfix(Target):
    """A private Postfix taking the mail into its queue and holding it (bench/postfix.py)."""

    def __init__(self, label: str, root: Path, binary: str) -> None:
        super().__init__(label)
        self.root, self.binary = root, binary
        self.instance: PrivatePostfix | None = None

    def start(self) -> None:
        # Postfix takes a port number, not 0: probe one, and check that its master got it.
        self.port = probe_port()
        try:
            start_on_probed_port(self._start_once, stop=self.stop,
                                 use_port=lambda port: setattr(self, "port", port))
        except PortTaken:
            log = self.instance.log() if self.instance else ""
            self.stop()
            raise RuntimeError(f"Postfix did not get a port: {log}") from None

    def _start_once(self) -> None:
        self.instance = PrivatePostfix(self.root, self.port, DOMAIN, self.binary)
        self.instance.start()
        self.pid = pid = self.instance.pid
        if not wait_until_listening(pid, self.port, running=lambda: psutil.pid_exists(pid),
                                    timeout=30):
            raise PortTaken(self.port)  # not listening either: start again, as when taken

    def stored(self) -> int:
        return self.instance.held() if self.instance else 0

    def stop(self) -> None:
        if self.instance is not None:
            self.instance.stop()
            self.instance = None


class Server(Target):
    """`smtpd-agent serve` from the tree at `code`, with its own state directory."""

    def __init__(self, label: str, code: Path, env: dict[str, str], state: Path,
                 profile: Path | None) -> None:
        super().__init__(label)
        self.code, self.state, self.profile = code, state, profile
        self.env = {**env, "SMTPD_AGENT_SERVER_STATE_DIR": str(state), "PYTHONPATH": str(code),
                    "SMTPD_AGENT_HTTP_PORT": "0"}
        self.cli = [sys.executable, "-m", "smtpd_agent"]

    def start(self) -> None:
        for command in (["workspace", "add", "load"], ["agent", "add", RCPT, "--no-auto-reply"]):
            subprocess.run(self.cli + command, env=self.env, cwd=self.code, check=True,
                           capture_output=True)
        serve = [*self.cli, "serve", "--port", "0"]
        if self.profile:
            self.profile.mkdir(parents=True, exist_ok=True)
            py_spy = shutil.which("py-spy",
                                  path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
            if not py_spy:
                raise SystemExit("--profile needs py-spy (pip install py-spy)")
            serve = [py_spy, "record", "--threads", "-f", "raw", "-o",
                     str(self.profile / "server.folded"), "--", *serve]
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.state / "serve.log", "w") as log:
            self.process = subprocess.Popen(serve, env=self.env, cwd=self.code, stdout=log,
                                            stderr=subprocess.STDOUT)
        # server.listening (not the newer server.ready): a --baseline tree logs it too
        self.port = wait_for_listening(self.state / "serve.log", self.process,
                                       "server.listening")
        self.pid = self.process.pid
        if self.profile:
            children = psutil.Process(self.pid).children()
            self.pid = children[0].pid if children else self.pid
        self.uses_postgres = True
        pid_file = self.state / "pgdata" / "postmaster.pid"
        if "DATABASE_URL" not in self.env and pid_file.exists():
            self.postmaster = int(pid_file.read_text().split()[0])

    @property
    def database_url(self) -> str:
        return self.env.get("DATABASE_URL") or (
            f"postgresql://postgres@/{EMBEDDED_DATABASE}?host={self.state / 'pgdata'}")

    def stored(self) -> int:
        listed = subprocess.run(self.cli + ["inbox", RCPT, "--json", "--limit", "1000000"],
                                env=self.env, cwd=self.code, capture_output=True, text=True,
                                check=True)
        return sum(len(t["messages"]) for t in json.loads(listed.stdout))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT if self.profile else signal.SIGTERM)
            self.process.wait(60)


def search_catch_up(server: Server, messages: int) -> dict[str, float]:
    """Wait until the round's messages are all searchable: how long after the last reply
    that took, and the Postgres CPU it cost per 1,000 messages. The indexer yields to
    a burst of mail (store.search_max_delay), so part of its work comes after the round;
    it must not run into the next target's round, and its cost is reported beside the
    round's own. One connection for the whole wait (a tree with no search queue, which
    indexes in the store transaction, has nothing to wait for)."""

    async def wait() -> float:
        connection = await asyncpg.connect(server.database_url)
        try:
            began = time.monotonic()
            while await connection.fetchval("SELECT EXISTS (SELECT FROM search_queue)"):
                if time.monotonic() - began > 300:
                    raise RuntimeError(f"{server.label}: search still behind after 300 s")
                await asyncio.sleep(0.05)
            return time.monotonic() - began
        except asyncpg.UndefinedTableError:
            return 0.0
        finally:
            await connection.close()

    postgres_before = postgres_cpu(server.postmaster)
    seconds = asyncio.run(wait())
    return {"seconds": round(seconds, 2),
            "postgres_cpu_seconds_per_1000": round(
                (postgres_cpu(server.postmaster) - postgres_before) / messages * 1000, 3)}


def median_figures(rounds: list[Figures]) -> Figures:
    """Each figure's median over the rounds; failures added up."""
    numbers = {name: round(statistics.median(getattr(f, name) for f in rounds), 2)
               for name, value in asdict(rounds[0]).items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    failures: dict[str, int] = {}
    for figures in rounds:
        for key, count in figures.failures.items():
            failures[key] = failures.get(key, 0) + count
    return Figures(**{**asdict(rounds[0]), **numbers, "failures": failures})


def cpu_speed_ms() -> float:
    """Milliseconds for a fixed pure-Python loop: how fast the (shared) machine runs now."""
    began = time.perf_counter()
    total = 0
    for number in range(1_000_000):
        total += number * number
    return round((time.perf_counter() - began) * 1000, 1)


def baseline_tree(rev: str, work: Path) -> Path:
    """A detached worktree of `rev`, to measure an earlier version in the same run."""
    tree = work / f"baseline-{rev}"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, check=True,
                   capture_output=True)
    return tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure each server and the sink this many times, alternating; "
                             "the figures are the medians")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5000, help="approximate message bytes")
    parser.add_argument("--attachment", action="store_true", help="add a base64 attachment")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--log-level", default="info", choices=["debug", "info"],
                        help="the server's; its port is read from the info line "
                             "server.listening")
    parser.add_argument("--profile", type=Path,
                        help="record the server with py-spy into this directory (needs py-spy)")
    parser.add_argument("--no-sink", action="store_true", help="skip the bare-sink reference")
    parser.add_argument("--no-postfix", action="store_true",
                        help="skip the private Postfix reference (used when installed)")
    parser.add_argument("--processes", type=int, default=1,
                        help="smtp.processes: accepting processes sharing the port")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure git revision REV (e.g. before an optimization)")
    parser.add_argument("--session-layer", choices=["aiosmtpd", "native", "both"],
                        help="smtp.session of the server (default: the configured one); "
                             "both: measure the two layers in the same rounds, the native "
                             "one as \"smtpd-agent (native)\"")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="smtpd-agent-bench-"))
    clamd = None
    baseline = None
    dns = DnsTestServer().__enter__()
    try:
        key = rsa_key(2048)
        dns.txt(SENDER_DOMAIN, "v=spf1 ip4:127.0.0.1 -all")
        dns.txt(f"sel._domainkey.{SENDER_DOMAIN}", key.record)
        dns.txt(f"_dmarc.{SENDER_DOMAIN}", "v=DMARC1; p=reject")

        env = {**os.environ, "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": DOMAIN,
               "SMTPD_AGENT_DNS_NAMESERVERS": dns.nameserver,
               "SMTPD_AGENT_LOG_LEVEL": args.log_level, "SMTPD_AGENT_LOG_FORMAT": "json",
               "SMTPD_AGENT_SMTP_MAX_CONNECTIONS_PER_IP": str(args.sessions * 4),
               "SMTPD_AGENT_SMTP_PROCESSES": str(args.processes)}
        scanning = find_clamd() is not None
        if scanning:
            (work / "clamd").mkdir()
            clamd = Clamd(root=work / "clamd", binary=find_clamd())
            clamd.start()
            env["SMTPD_AGENT_SCAN_CLAMD"] = clamd.unix_address

        payloads = make_payloads(args.messages * args.rounds + WARMUP, args.size,
                                 args.attachment, key)
        warmup = work / "warmup.bin"
        write_payloads(payloads[:WARMUP], warmup)
        measured = []
        for index in range(args.rounds):
            measured.append(work / f"round{index}.bin")
            first = WARMUP + index * args.messages
            write_payloads(payloads[first:first + args.messages], measured[-1])

        layer = args.session_layer
        server_env = {**env, "SMTPD_AGENT_SMTP_SESSION": "aiosmtpd" if layer == "both" else layer
                      } if layer else env
        servers: list[Target] = [Server("smtpd-agent", REPO, server_env, work / "state",
                                        args.profile)]
        if layer == "both":
            servers.append(Server(NATIVE, REPO, {**env, "SMTPD_AGENT_SMTP_SESSION": "native"},
                                  work / "state-native", None))
        if args.baseline:
            baseline = baseline_tree(args.baseline, work)
            servers.insert(0, Server(f"smtpd-agent @ {args.baseline}", baseline, env,
                                     work / "state-baseline", None))
        references: list[Target] = [] if args.no_sink else [Sink("bare aiosmtpd sink")]
        postfix_binary = None if args.no_postfix else find_postfix()
        if postfix_binary:
            references.append(Postfix("postfix (queue, hold)", work / "postfix", postfix_binary))
        elif not args.no_postfix:
            print("Postfix not installed (or not root): measured without it. Install it with "
                  "DEBIAN_FRONTEND=noninteractive apt-get install -y postfix", file=sys.stderr)
        targets = servers + references
        rounds: dict[str, list[Figures]] = {t.label: [] for t in targets}
        catch_up: dict[str, list[dict[str, float]]] = {t.label: [] for t in servers}
        speeds = []
        try:
            for target in targets:
                target.start()
                drive("warm-up", target.port, target.pid, warmup, args.sessions)
            for index in range(args.rounds):
                # Alternate, and rotate who goes first: the machine's speed drifts.
                order = targets[index % len(targets):] + targets[:index % len(targets)]
                speeds.append(cpu_speed_ms())
                for target in order:
                    rounds[target.label].append(drive(
                        target.label, target.port, target.pid, measured[index], args.sessions,
                        target.postmaster, target.uses_postgres,
                        clamd.process.pid if clamd and clamd.process else None))
                    if isinstance(target, Server):
                        catch_up[target.label].append(search_catch_up(target, args.messages))
            stored = {t.label: t.stored() for t in servers}  # type: ignore[attr-defined]
            held = {t.label: t.stored() for t in references if isinstance(t, Postfix)}
        finally:
            for target in targets:
                target.stop()
        stages = {t.label: stage_times(t.state / "serve.log", WARMUP)  # type: ignore[attr-defined]
                  for t in servers}
        figures = [median_figures(rounds[t.label]) for t in targets]
        report = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "cpu_speed_ms_per_round": speeds},
            "load": {"messages": args.messages, "rounds": args.rounds,
                     "sessions": args.sessions, "size": args.size,
                     "processes": args.processes, "session_layer": args.session_layer,
                     "attachment": args.attachment, "dkim_signed": True,
                     "pipeline": ["spf", "dkim", "arc", "dmarc"] + (["clamd"] if scanning else [])
                     + ["postgres commit"]},
            "stored": stored,
            "stage_ms_mean": {label: times["mean"] for label, times in stages.items()},
            "stage_ms_p99": {label: times["p99"] for label, times in stages.items()},
            "results": [asdict(f) for f in figures],
            "rounds": {label: [asdict(f) for f in rows] for label, rows in rounds.items()},
            "search_catch_up": {label: {key: round(statistics.median(r[key] for r in rows), 3)
                                        for key in rows[0]}
                                for label, rows in catch_up.items() if rows},
            "search_catch_up_rounds": catch_up,
        }
        current = next(f for f in figures if f.name == "smtpd-agent")
        for key, prefix in (("sink", "bare"), ("postfix", "postfix")):
            row = next((f for f in figures if f.name.startswith(prefix)), None)
            if row is None or not row.messages_per_second:
                continue
            # Paired per round (both measured on the same minute's machine), then the median.
            per_round = [round(ours.messages_per_second / theirs.messages_per_second, 3)
                         for ours, theirs in zip(rounds["smtpd-agent"], rounds[row.name])]
            report[f"ratio_to_{key}"] = round(statistics.median(per_round), 3)
            report[f"ratio_to_{key}_per_round"] = per_round
            report[f"ratio_of_medians_{key}"] = round(current.messages_per_second
                                                      / row.messages_per_second, 3)
        if held:
            report["postfix_held"] = held
        if NATIVE in rounds:
            # The native session layer against aiosmtpd's, paired per round.
            per_round = [round(ours.messages_per_second / theirs.messages_per_second, 3)
                         for ours, theirs in zip(rounds[NATIVE], rounds["smtpd-agent"])
                         if theirs.messages_per_second]
            report["native_to_aiosmtpd_per_round"] = per_round
            report["native_to_aiosmtpd"] = round(statistics.median(per_round), 3) if per_round else 0
        report["dns_queries"] = len(dns.queries)
        print_table(report)
        print(f"DNS queries that reached the test server: {len(dns.queries)} "
              "(the rest were answered from the servers' caches)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
        expected = args.messages * args.rounds + WARMUP
        return 0 if all(count == expected for count in (*stored.values(), *held.values())) else 1
    finally:
        if clamd:
            clamd.stop()
        dns.__exit__(None, None, None)
        if baseline:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO,
                           capture_output=True)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def stage_times(log_file: Path, skip: int = 0) -> dict[str, dict[str, float]]:
    """Milliseconds per pipeline stage, from the server's smtp.accepted events after the
    first `skip` (the warm-up's, answered before any round began): the mean and the 99th
    percentile of each (which stage makes the slow replies slow)."""
    times: dict[str, list[float]] = {}
    events = [line for line in log_file.read_text().splitlines() if '"smtp.accepted"' in line]
    for line in events[skip:]:
        for stage, ms in json.loads(line).get("ms", {}).items():
            times.setdefault(stage, []).append(ms)
    return {"mean": {stage: round(statistics.fmean(values), 2) for stage, values in times.items()},
            "p99": {stage: sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]
                    for stage, values in times.items()}}


def print_table(report: dict) -> None:
    load = report["load"]
    print(f"\n{load['rounds']} x {load['messages']} messages of ~{load['size']} bytes"
          f"{' with an attachment' if load['attachment'] else ''}, {load['sessions']} sessions, "
          f"pipeline: {' + '.join(load['pipeline'])}")
    print(f"{'server':<22}{'msg/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'RSS MB':>9}{'CPU s/1k':>10}{'PG s/1k':>9}{'busy%':>7}{'loop%':>7}  failures")
    for row in report["results"]:
        print(f"{row['name']:<22}{row['messages_per_second']:>9}{row['p50_ms']:>9}"
              f"{row['p95_ms']:>9}{row['p99_ms']:>9}{row['peak_rss_mb']:>9}"
              f"{row['cpu_seconds_per_1000']:>10}{row['postgres_cpu_seconds_per_1000']:>9}"
              f"{row['machine_busy_percent']:>7}{row['loop_busy_percent']:>7}"
              f"  {row['failures'] or '-'}")
    print("machine CPU per message (ms; every process and the kernel), and its parts:")
    print(f"{'server':<22}{'machine':>9}{'server':>9}{'Postgres':>10}{'clamd':>8}{'client':>8}"
          f"{'rest':>8}")
    for row in report["results"]:
        parts = [row["cpu_seconds_per_1000"], row["postgres_cpu_seconds_per_1000"],
                 row["clamd_cpu_seconds_per_1000"], row["client_cpu_seconds_per_1000"]]
        rest = round(row["machine_cpu_ms_per_message"] - sum(parts), 2)
        print(f"{row['name']:<22}{row['machine_cpu_ms_per_message']:>9}{parts[0]:>9}"
              f"{parts[1]:>10}{parts[2]:>8}{parts[3]:>8}{rest:>8}")
    for key, name in (("sink", "the bare sink"), ("postfix", "Postfix")):
        if f"ratio_to_{key}" in report:
            per_round = ", ".join(f"{r:.1%}" for r in report[f"ratio_to_{key}_per_round"])
            print(f"ratio to {name}: {report[f'ratio_to_{key}']:.1%} (median of the rounds "
                  f"{per_round}; ratio of the medians {report[f'ratio_of_medians_{key}']:.1%})")
    if "native_to_aiosmtpd" in report:
        per_round = ", ".join(f"{r:.2f}" for r in report["native_to_aiosmtpd_per_round"])
        print(f"native session layer / aiosmtpd: {report['native_to_aiosmtpd']:.2f} "
              f"(median of the rounds {per_round})")
    print(f"medians of {load['rounds']} alternating rounds; machine speed per round (ms for a "
          f"fixed loop, lower is faster): {report['machine']['cpu_speed_ms_per_round']}")
    for label, count in report.get("postfix_held", {}).items():
        print(f"{label}: held in its queue {count}")
    for label, count in report["stored"].items():
        print(f"{label}: stored in Postgres {count}; ms per stage, mean "
              f"{report['stage_ms_mean'][label]}, p99 {report['stage_ms_p99'][label]}")
    for label, figures in report.get("search_catch_up", {}).items():
        print(f"{label}: every message searchable {figures['seconds']} s after the round's "
              f"last reply; Postgres CPU meanwhile {figures['postgres_cpu_seconds_per_1000']} "
              "s/1k (beside the PG s/1k above)")


if __name__ == "__main__":
    raise SystemExit(main())
