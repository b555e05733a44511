"""tests/ports.py: the daemon start helpers clamd, rspamd and bench/run.py's Postfix share;
tests/support.required, the skip-or-fail-in-CI rule for a missing program.

Real processes and sockets on loopback: a child that listens on the port it is given stands
in for a daemon that takes its port from a config file.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests import support
from tests.ports import (
    DAEMON_PORT_ATTEMPTS,
    PortTaken,
    find_daemon,
    probe_port,
    start_on_probed_port,
    wait_until_listening,
)
from tests.support import required

LISTEN = ("import socket, sys, time\n"
          "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
          "time.sleep(120)\n")


@contextmanager
def listening_child(port: int) -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", LISTEN, str(port)])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_daemon_that_listens_on_its_port_is_waited_for() -> None:
    port = probe_port()
    with listening_child(port) as child:
        assert wait_until_listening(child.pid, port, running=lambda: child.poll() is None,
                                    timeout=60)


def test_it_waits_for_the_daemon_to_answer_too() -> None:
    port = probe_port()
    asked = []

    def answers() -> bool:
        asked.append(1)
        return len(asked) >= 3

    with listening_child(port) as child:
        running = lambda: child.poll() is None  # noqa: E731
        assert wait_until_listening(child.pid, port, running=running, timeout=60)
        # listening already: it is the answer that is waited for, and asked for no more
        assert wait_until_listening(child.pid, port, running=running, answers=answers,
                                    timeout=60, pause=0.01)
    assert len(asked) == 3


def test_a_port_another_process_listens_on_is_taken() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with listening_child(probe_port()) as child, pytest.raises(PortTaken):
            wait_until_listening(child.pid, port, running=lambda: child.poll() is None,
                                 timeout=60)


def test_a_daemon_that_exits_or_never_listens_is_not_waited_for_forever() -> None:
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    assert not wait_until_listening(exited.pid, probe_port(),
                                    running=lambda: exited.poll() is None, timeout=60)
    with listening_child(probe_port()) as child:  # listens, but on another port
        assert not wait_until_listening(child.pid, probe_port(),
                                        running=lambda: child.poll() is None, timeout=0.5)


def test_a_taken_port_is_stopped_and_started_again_on_a_new_one() -> None:
    ports: list[int] = []
    stops: list[int] = []

    def start_once() -> None:
        if len(ports) < 2:
            raise PortTaken(0)

    start_on_probed_port(start_once, stop=lambda: stops.append(1), use_port=ports.append)
    assert len(ports) == 2 == len(stops) and all(port > 0 for port in ports)


def test_after_every_attempt_the_last_port_taken_reaches_the_caller() -> None:
    starts = []

    def start_once() -> None:
        starts.append(1)
        raise PortTaken(0)

    with pytest.raises(PortTaken):
        start_on_probed_port(start_once, stop=lambda: None, use_port=lambda port: None)
    assert len(starts) == DAEMON_PORT_ATTEMPTS


def test_a_daemon_binary_is_found_or_named_by_its_variable(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("SMTPD_AGENT_TEST_DAEMON", raising=False)
    assert find_daemon(sys.executable, "SMTPD_AGENT_TEST_DAEMON") == sys.executable
    missing = str(tmp_path / "no-such-daemon")
    assert find_daemon(missing, "SMTPD_AGENT_TEST_DAEMON") is None
    monkeypatch.setenv("SMTPD_AGENT_TEST_DAEMON", missing)  # a machine without it
    assert find_daemon(sys.executable, "SMTPD_AGENT_TEST_DAEMON") is None
    monkeypatch.setenv("SMTPD_AGENT_TEST_DAEMON", sys.executable)
    assert find_daemon(missing, "SMTPD_AGENT_TEST_DAEMON") == sys.executable


def test_a_missing_program_skips_its_test_but_fails_it_in_ci(monkeypatch) -> None:
    assert required("/usr/bin/dig", "dig", "dnsutils") == "/usr/bin/dig"
    monkeypatch.setattr(support, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y dnsutils"):
        required(None, "dig", "dnsutils")
    monkeypatch.setattr(support, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI=true, so this is a failure"):
        required(None, "dig", "dnsutils")
