"""A private Postfix instance as a benchmark target: the reference MTA, side by side.

It has its own config_directory, queue_directory and data_directory under the bench work
directory, every master.cf service unchrooted, one smtpd on 127.0.0.1 and a free high port,
and accepts mail for the bench domain into its queue (fsync'd before the 250, as always)
where `check_recipient_access static:HOLD` keeps it: nothing is delivered or bounced.
The system's own Postfix (if any) is neither read nor touched. Needs root (Postfix's
master runs as root and drops to mail_owner) and the Debian package:

    DEBIAN_FRONTEND=noninteractive apt-get install -y postfix

(the package's own instance need not run; `policy-rc.d` may keep it stopped).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

MASTER_CF = (Path("/usr/share/postfix/master.cf.dist"), Path("/etc/postfix/master.cf"))


def find_postfix() -> str | None:
    """The `postfix` command when Postfix is installed and we can run a private master."""
    binary = shutil.which("postfix", path=f"/usr/sbin:/sbin:{os.environ.get('PATH', '')}")
    if binary is None or os.geteuid() != 0 or not any(p.exists() for p in MASTER_CF):
        return None
    return binary


def postconf_default(name: str) -> str:
    out = subprocess.run(["postconf", "-dh", name], capture_output=True, text=True, check=True)
    return out.stdout.strip()


class PrivatePostfix:
    """`start()` writes the configuration and starts master; `stop()` stops it."""

    def __init__(self, root: Path, port: int, domain: str, binary: str = "postfix") -> None:
        self.root, self.port, self.domain, self.binary = root, port, domain, binary
        self.config = root / "etc"
        self.queue = root / "queue"
        self.data = root / "data"

    def main_cf(self) -> str:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue, "data_directory": self.data,
            "command_directory": postconf_default("command_directory"),
            "daemon_directory": postconf_default("daemon_directory"),
            "meta_directory": postconf_default("meta_directory"),
            "shlib_directory": postconf_default("shlib_directory"),
            "mail_owner": "postfix", "setgid_group": "postdrop",
            "myhostname": f"postfix.{self.domain}", "mydomain": self.domain,
            "myorigin": "$myhostname",
            # the recipient domain is ours; every local part is taken (no user table)
            "mydestination": f"load.{self.domain}", "local_recipient_maps": "",
            "alias_maps": "", "alias_database": "",
            "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # into the queue, and held there
            "smtpd_recipient_restrictions": "check_recipient_access static:HOLD, "
                                            "reject_unauth_destination",
            "smtpd_client_connection_count_limit": "0",
            "default_process_limit": "200",
            "maillog_file": self.root / "maillog", "maillog_file_prefixes": self.root,
            "biff": "no", "append_dot_mydomain": "no",
        }
        return "".join(f"{key} = {value}\n" for key, value in settings.items())

    def postconf(self, *args: str) -> None:
        subprocess.run(["postconf", "-c", str(self.config), *args], check=True,
                       capture_output=True, text=True)

    def start(self) -> None:
        self.config.mkdir(parents=True, exist_ok=True)
        self.queue.mkdir(mode=0o755, exist_ok=True)  # root's; `postfix check` fills it in
        self.data.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(self.data, "postfix")
        for parent in (self.root, *self.root.parents):  # the postfix user walks down to it
            if parent == Path("/"):
                break
            if parent.stat().st_mode & 0o011 != 0o011:
                parent.chmod(parent.stat().st_mode | 0o011)
        (self.config / "main.cf").write_text(self.main_cf())
        shutil.copy(next(p for p in MASTER_CF if p.exists()), self.config / "master.cf")
        self.postconf("-F", "*/*/chroot = n")
        self.postconf("-MX", "smtp/inet")
        listen = f"127.0.0.1:{self.port}"
        self.postconf("-M", f"{listen}/inet = {listen} inet n - n - - smtpd")
        self.postconf("-e", "maillog_file_permissions = 0644")
        for command in ("check", "start"):
            done = subprocess.run([self.binary, "-c", str(self.config), command],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"postfix {command}: {done.stdout}{done.stderr}{self.log()}")

    @property
    def pid(self) -> int:
        return int((self.queue / "pid" / "master.pid").read_text().split()[0])

    def held(self) -> int:
        """Messages in the hold queue: what the 250s put there."""
        return sum(len(files) for _, _, files in os.walk(self.queue / "hold"))

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text()[-3000:] if path.exists() else ""

    def stop(self) -> None:
        done = subprocess.run([self.binary, "-c", str(self.config), "stop"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run([self.binary, "-c", str(self.config), "abort"], capture_output=True)
