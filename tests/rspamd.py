"""A real rspamd for the tests: Debian's `rspamd`, started as a subprocess.

Debian's stock configuration with a `local.d/` of ours (LOCAL_CONFDIR) in a
temporary directory: one normal worker on a free loopback port, no
controller, proxy or fuzzy workers, and every module that would reach the
network or needs Redis switched off (RBLs, SURBL, fuzzy, ASN, Bayes...).
DNS goes to the tests' own DNS server on loopback (tests/dnsserver.py), so
rspamd's SPF/DKIM/DMARC lookups get fast, repeatable answers; without one
given, to an address nobody answers, with a short timeout (then every check
waits about a second and the DNS-failure symbols vary with the load). The
hostname heuristics (hfilter) are off: their scores depend on the client's
DNS, which the tests do not set up.

Two test rules of our own: the multimap symbol `SMTPD_AGENT_TEST_SPAM`
scores a Subject containing `SPAM_TOKEN` at 8, over the `add header`
threshold (6) and under `reject` (15); a Subject containing
`SOFT_REJECT_TOKEN` forces the action `soft reject`. GTUBE is rspamd's own
(action reject).

rspamd refuses to run as root, so as root it drops to `_rspamd`; the
directory is then made writable for that user. Start-up compiles the public
suffix list: seconds on an idle machine, much longer on a loaded one.

Deliberately synchronous and free of smtpd_agent imports, like tests/clamd.py.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import find_daemon, probe_port, start_on_probed_port, wait_until_listening

RSPAMD_BINARY = "/usr/bin/rspamd"
APT_PACKAGES = ("rspamd",)
STOCK_CONFIG = "/etc/rspamd/rspamd.conf"

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SPAM_TOKEN = "SMTPDAGENT-SPAMTOKEN-7Q3"
SPAM_SYMBOL = "SMTPD_AGENT_TEST_SPAM"
# A Subject with this token gets rspamd's "soft reject" (a multimap rule forcing the action).
SOFT_REJECT_TOKEN = "SMTPDAGENT-SOFTREJECT-4K8"

DISABLED_MODULES = ("fuzzy_check", "rbl", "surbl", "asn", "emails", "phishing",
                    "url_redirector", "classifier-bayes", "greylist", "hfilter", "ratelimit", "replies",
                    "neural", "reputation", "history_redis", "dcc", "mx_check", "spamtrap")


def find_rspamd() -> str | None:
    """Path of rspamd, or None; `SMTPD_AGENT_TEST_RSPAMD` names another."""
    return find_daemon(RSPAMD_BINARY, "SMTPD_AGENT_TEST_RSPAMD")


class RspamdError(RuntimeError):
    """rspamd did not come up (its output tail is in the message)."""


@dataclass
class Rspamd:
    """One rspamd with its own local.d, database, run and log directories under `root`."""

    root: Path
    binary: str = RSPAMD_BINARY
    port: int = field(default_factory=probe_port)
    nameserver: str = "127.0.0.1:9"  # the discard port: nothing answers
    process: subprocess.Popen[bytes] | None = None
    start_seconds: float = 0.0

    @property
    def url(self) -> str:
        """In the form of the `spam.rspamd` setting."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def write_config(self) -> None:
        local = self.root / "local.d"
        for name in ("local.d", "db", "run", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        files = {
            "worker-normal.inc": f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n',
            "worker-controller.inc": "enabled = false;\n",
            "worker-proxy.inc": "enabled = false;\n",
            "worker-fuzzy.inc": "enabled = false;\n",
            "logging.inc": 'type = "console";\nlevel = "error";\n',
            "options.inc": f'dns {{\n  nameserver = ["{self.nameserver}"];\n'
                           '  timeout = 0.5s;\n  retransmits = 1;\n}\n',
            "actions.conf": "reject = 15;\nadd_header = 6;\ngreylist = 4;\n",
            "multimap.conf": (
                f"{SPAM_SYMBOL} {{\n  type = \"header\";\n  header = \"Subject\";\n"
                "  regexp = true;\n  map = \"${LOCAL_CONFDIR}/local.d/test-spam.map\";\n"
                "  score = 8.0;\n  description = \"smtpd-agent test token\";\n}\n"
                "SMTPD_AGENT_TEST_SOFT_REJECT {\n  type = \"header\";\n  header = \"Subject\";\n"
                "  regexp = true;\n  map = \"${LOCAL_CONFDIR}/local.d/test-soft.map\";\n"
                "  action = \"soft reject\";\n  message = \"try later\";\n}\n"),
            "test-spam.map": f"/{SPAM_TOKEN}/\n",
            "test-soft.map": f"/{SOFT_REJECT_TOKEN}/\n",
        }
        files |= {f"{module}.conf": "enabled = false;\n" for module in DISABLED_MODULES}
        for name, text in files.items():
            (local / name).write_text(text)
        for path in [self.root, *self.root.rglob("*")]:
            path.chmod(0o777 if path.is_dir() else 0o666)

    def command(self) -> list[str]:
        user = ["-u", "_rspamd", "-g", "_rspamd"] if os.geteuid() == 0 else []
        return [self.binary, "-f", *user, "-c", STOCK_CONFIG,
                "--var", f"LOCAL_CONFDIR={self.root}", "--var", f"DBDIR={self.root / 'db'}",
                "--var", f"RUNDIR={self.root / 'run'}", "--var", f"LOGDIR={self.root / 'log'}"]

    def start(self, timeout: float = 180.0) -> None:
        """Start rspamd and return once /ping answers from the worker it started.

        rspamd takes its port from the config (it does not bind port 0); when another
        process got the probed port first, stop, probe another port and start again."""
        if self.running:
            return
        start_on_probed_port(lambda: self._start_once(timeout), stop=self.stop,
                             use_port=lambda port: setattr(self, "port", port))

    def _start_once(self, timeout: float) -> None:
        self.write_config()
        began = time.monotonic()
        with open(self.root / "rspamd.out", "ab") as output:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                            stdout=output, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        process = self.process
        if wait_until_listening(process.pid, self.port, running=lambda: process.poll() is None,
                                answers=self.ping, timeout=timeout):
            self.start_seconds = time.monotonic() - began
            return
        if process.poll() is not None:
            raise RspamdError(f"rspamd exited with {process.returncode}:\n{self.output_tail()}")
        self.stop()
        raise RspamdError(f"rspamd did not answer /ping within {timeout}s:\n{self.output_tail()}")

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to the main process (it stops its workers), SIGKILL to the group if slow."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=5)
        self.process = None

    def output_tail(self, lines: int = 30) -> str:
        try:
            text = (self.root / "rspamd.out").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
