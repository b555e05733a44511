"""SIGHUP to a real `smtpd-agent serve`: new certificates for new STARTTLS sessions, open
sessions untouched, and a broken file refused without harming the running server."""

from __future__ import annotations

import hashlib
import signal
import smtplib
from pathlib import Path

from smtpd_agent.store import directory
from tests.ops.serve_process import ServeProcess, write_config
from tests.tls import client_context, fingerprint, write_self_signed


def starttls_session(port: int) -> tuple[smtplib.SMTP, str]:
    """An SMTP session upgraded with STARTTLS, and the fingerprint of the cert it was shown."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=15)
    client.ehlo("client.example.org")
    assert client.has_extn("starttls")
    client.starttls(context=client_context())
    client.ehlo("client.example.org")
    der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    return client, hashlib.sha256(der).hexdigest()


def reload(server: ServeProcess) -> None:
    server.signal(signal.SIGHUP)
    server.wait_for_state("RELOADING=1", timeout=15)
    server.wait_for_state("READY=1", timeout=15)


async def test_sighup_serves_the_new_certificate_to_new_sessions_only(serve_process, db,
                                                                      tmp_path: Path):
    tls = tmp_path / "tls"
    cert, key = write_self_signed(tls)
    old = fingerprint(cert)
    server = serve_process(**{"smtp.tls_cert": str(cert), "smtp.tls_key": str(key)})
    await directory.add_workspace(db, "acme", "Acme")
    await directory.add_agent(db, "acme", "support")

    before, seen = starttls_session(server.port)
    assert seen == old

    # A renewal as certbot's deploy hook does it: new files at the same paths, then HUP.
    write_self_signed(tls)
    new = fingerprint(cert)
    assert new != old
    reload(server)
    after, seen = starttls_session(server.port)
    assert seen == new
    assert server.events("server.reloaded")[-1]["tls_cert_sha256"] == new

    # The session opened before the reload carries on over its TLS connection.
    refused = before.sendmail("alice@example.org", ["support@acme.agents.test"],
                              b"From: alice@example.org\r\nSubject: still here\r\n"
                              b"Message-ID: <survivor@example.org>\r\n\r\nHi\r\n")
    assert refused == {}
    assert await db.fetchval("SELECT tls FROM messages WHERE message_id = "
                             "'<survivor@example.org>'") is True
    for client in (before, after):
        client.quit()

    # A broken key on the next reload is refused; the server keeps the certificate it has.
    key.write_text("not a key\n")
    reload(server)
    assert server.events("config.reload_failed")
    client, seen = starttls_session(server.port)
    assert seen == new
    client.quit()
    assert server.process.poll() is None


async def test_sighup_applies_live_settings_and_names_those_needing_a_restart(serve_process,
                                                                            db):
    server = serve_process(**{"smtp.max_recipients": 1})
    await directory.add_workspace(db, "acme", "Acme")
    await directory.add_agent(db, "acme", "support")
    await directory.add_agent(db, "acme", "sales")
    recipients = ["support@acme.agents.test", "sales@acme.agents.test"]

    def second_rcpt_code() -> int:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=15) as client:
            client.ehlo("client.example.org")
            client.mail("alice@example.org")
            client.rcpt(recipients[0])
            return client.rcpt(recipients[1])[0]

    assert second_rcpt_code() == 452
    settings = {**server.settings, "smtp.max_recipients": 5, "dns.timeout": 2}
    write_config(server.config, settings)
    reload(server)
    assert second_rcpt_code() == 250
    assert server.events("config.restart_needed")[-1]["keys"] == ["dns.timeout"]
