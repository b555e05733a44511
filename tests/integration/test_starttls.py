"""STARTTLS over real sockets: advertised with a certificate, the upgrade recorded on the
stored message, and `smtp.require_starttls` refusing MAIL in the clear."""

from __future__ import annotations

from email.message import EmailMessage

import aiosmtplib
import pytest

from smtpd_agent.smtp import replies
from smtpd_agent.store import directory
from tests.support import SESSION_LAYERS, Dialogue, enhanced
from tests.tls import client_context, write_self_signed


@pytest.fixture(scope="module", params=SESSION_LAYERS)
def smtp_session(request: pytest.FixtureRequest) -> str:
    """Every test here runs against both session layers (smtp.session)."""
    return request.param


def note(address: str, subject: str = "Over TLS") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "alice@example.org"
    message["To"] = address
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    message.set_content("Sent after STARTTLS.\n")
    return message


async def test_starttls_is_advertised_used_and_recorded(start_server, db, domain, tmp_path):
    cert, key = write_self_signed(tmp_path / "tls")
    server = start_server(**{"smtp.tls_cert": str(cert), "smtp.tls_key": str(key)})
    await directory.add_workspace(db, "acme", "Acme")
    await directory.add_agent(db, "acme", "support")
    address = f"support@acme.{domain}"

    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, start_tls=False,
                             use_tls=False, tls_context=client_context(cafile=cert))
    async with client:
        await client.ehlo()
        assert client.supports_extension("starttls")
        await client.starttls()
        await client.ehlo()
        assert not client.supports_extension("starttls"), "STARTTLS offered twice"
        errors, reply = await client.send_message(note(address))
    assert errors == {} and reply.startswith("2.0.0")

    row = await db.fetchrow("SELECT tls, tls_version FROM messages")
    assert row["tls"] is True
    assert row["tls_version"] in ("TLSv1.2", "TLSv1.3")


async def test_require_starttls_refuses_mail_in_the_clear(start_server, tmp_path):
    cert, key = write_self_signed(tmp_path / "tls")
    server = start_server(**{"smtp.tls_cert": str(cert), "smtp.tls_key": str(key),
                             "smtp.require_starttls": True})
    dialogue = Dialogue.open(server.port)
    assert dialogue.reply()[0] == 220
    dialogue.send(b"EHLO client.example.org\r\n")
    code, lines = dialogue.reply()
    assert code == 250 and any(line[4:] == b"STARTTLS" for line in lines)
    code, line = dialogue.command("MAIL FROM:<alice@example.org>")
    assert code == replies.STARTTLS_REQUIRED.code == 530
    assert enhanced(line) == replies.STARTTLS_REQUIRED.enhanced == "5.7.0"
