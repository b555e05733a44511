"""A real clamd for the tests: Debian's `clamav-daemon`, started as a subprocess.

freshclam cannot reach the internet here, so the signature database is ours:
one body signature (.ndb) matching the EICAR test string anywhere in a scanned
object, which is enough to prove that INSTREAM, MIME decoding and archive
unpacking all happen. clamd listens on a Unix socket in a temporary directory
(and, for the TCP path of the client, on a free loopback port). Tests can
stop, start, pause (SIGSTOP, to provoke timeouts) and resume it.

Deliberately synchronous and free of smtpd_agent imports: it is test
infrastructure, usable from any fixture or from a shell.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import find_daemon, probe_port, start_on_probed_port, wait_until_listening

CLAMD_BINARY = "/usr/sbin/clamd"
# Debian packages that provide it; the test script installs them when missing.
APT_PACKAGES = ("clamav-daemon",)

# The standard EICAR anti-virus test file (https://www.eicar.org/download-anti-malware-testfile/).
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE_NAME = "Eicar-Test-Signature"
# clamd appends this to names from databases that are not the official ones.
REPORTED_SIGNATURE = f"{SIGNATURE_NAME}.UNOFFICIAL"

# Small on purpose, so the "larger than clamd's StreamMaxLength" case is cheap to send.
STREAM_MAX_LENGTH = 2 * 1024 * 1024


def find_clamd() -> str | None:
    """Path of the clamd binary, or None; `SMTPD_AGENT_TEST_CLAMD` names another."""
    return find_daemon(CLAMD_BINARY, "SMTPD_AGENT_TEST_CLAMD")


class ClamdError(RuntimeError):
    """clamd did not come up (its log tail is in the message)."""


@dataclass
class Clamd:
    """One clamd process with its own config, database and sockets under `root`."""

    root: Path
    binary: str = CLAMD_BINARY
    stream_max_length: int = STREAM_MAX_LENGTH
    tcp_port: int = field(default_factory=probe_port)
    process: subprocess.Popen[bytes] | None = None
    start_seconds: float = 0.0

    @property
    def socket_path(self) -> Path:
        return self.root / "clamd.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "clamd.log"

    @property
    def unix_address(self) -> str:
        """In the form of the `scan.clamd` setting."""
        return f"unix:{self.socket_path}"

    @property
    def tcp_address(self) -> str:
        return f"tcp:127.0.0.1:{self.tcp_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def write_config(self) -> Path:
        database = self.root / "db"
        tmp = self.root / "tmp"
        database.mkdir(exist_ok=True)
        tmp.mkdir(exist_ok=True)
        # .ndb body signature: Name:TargetType:Offset:HexSignature; target 0 = any
        # file type, offset * = anywhere, so it also matches inside decoded MIME
        # parts and archive members.
        (database / "eicar.ndb").write_text(f"{SIGNATURE_NAME}:0:*:{EICAR.hex()}\n")
        config = self.root / "clamd.conf"
        config.write_text("\n".join([
            "Foreground yes",
            f"LocalSocket {self.socket_path}",
            "LocalSocketMode 600",
            f"TCPSocket {self.tcp_port}",
            "TCPAddr 127.0.0.1",
            f"DatabaseDirectory {database}",
            f"TemporaryDirectory {tmp}",
            f"LogFile {self.log_path}",
            "LogTime yes",
            "LogClean no",
            "LogSyslog no",
            f"StreamMaxLength {self.stream_max_length}",
            # Report files over the scan limits instead of passing them unscanned.
            "AlertExceedsMax yes",
            "ScanMail yes",
            "ScanArchive yes",
            # No database reload checks during a test run.
            "SelfCheck 0",
            "MaxThreads 4",
            "",
        ]))
        return config

    def start(self, timeout: float = 30.0) -> None:
        """Start clamd and return once it answers PING and listens on `tcp_port`.

        clamd takes its TCP port from the config (it does not bind port 0) and, when the
        port is taken, only logs it and serves the Unix socket: then stop, probe another
        port and start again."""
        if self.running:
            return
        start_on_probed_port(lambda: self._start_once(timeout), stop=self.stop,
                             use_port=lambda port: setattr(self, "tcp_port", port))

    def _start_once(self, timeout: float) -> None:
        config = self.write_config()
        self.socket_path.unlink(missing_ok=True)
        began = time.monotonic()
        with open(self.root / "clamd.stderr", "ab") as stderr:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [self.binary, "--config-file", str(config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        process = self.process
        if wait_until_listening(process.pid, self.tcp_port,
                                running=lambda: process.poll() is None, answers=self.ping,
                                timeout=timeout, pause=0.02):
            self.start_seconds = time.monotonic() - began
            return
        if process.poll() is not None:
            raise ClamdError(f"clamd exited with {process.returncode}:\n{self.log_tail()}")
        self.stop()
        raise ClamdError(f"clamd did not answer PING and listen on {self.tcp_port} "
                         f"within {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL; clamd removes its socket on a clean exit."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused clamd cannot handle SIGTERM
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.socket_path.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL, as a crash: no clean shutdown, connections just drop."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()
        self.socket_path.unlink(missing_ok=True)

    def pause(self) -> None:
        """SIGSTOP: the socket still accepts connections but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def ping(self, timeout: float = 1.0) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(self.socket_path))
                sock.sendall(b"zPING\0")
                return sock.recv(64).rstrip(b"\0\n") == b"PONG"
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for path in (self.log_path, self.root / "clamd.stderr"):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def start_clamd(root: Path | None = None) -> Clamd:
    """A running clamd under `root` (a fresh temporary directory by default)."""
    binary = find_clamd()
    if binary is None:
        raise ClamdError(f"clamd not found; install the Debian package(s) {' '.join(APT_PACKAGES)}")
    # Short path: a Unix socket path must fit in sun_path (108 bytes).
    clamd = Clamd(root=root or Path(tempfile.mkdtemp(prefix="clamd-")), binary=binary)
    clamd.start()
    return clamd


if __name__ == "__main__":  # pragma: no cover - manual use: python -m tests.clamd
    running = start_clamd()
    print(f"clamd up in {running.start_seconds:.2f}s at {running.unix_address} "
          f"and {running.tcp_address}; Ctrl-C stops it")
    try:
        signal.pause()
    finally:
        running.stop()
