"""Scanning wired into the listener: over real SMTP, against the real clamd."""

from __future__ import annotations

import io
import zipfile
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP

import pytest

from smtpd_agent.smtp import replies
from smtpd_agent.store import directory
from tests.clamd import EICAR, REPORTED_SIGNATURE
from tests.support import enhanced, smtp_send

PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
RCPT = "support@acme.agents.test"


def with_attachment(content: bytes, filename: str, tag: str) -> bytes:
    message = EmailMessage()
    message["From"] = "alice@example.org"
    message["To"] = RCPT
    message["Subject"] = tag
    message["Message-ID"] = f"<{tag}@example.org>"
    message.set_content("see attached")
    message.add_attachment(content, maintype="application", subtype="octet-stream",
                           filename=filename)
    return message.as_bytes(policy=SMTP)


def zipped_eicar() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("readme.txt", EICAR)
    return with_attachment(buffer.getvalue(), "docs.zip", "zipped")


def nested_base64_eicar() -> bytes:
    outer = MIMEMultipart("mixed")
    outer["From"], outer["To"], outer["Subject"] = "alice@example.org", RCPT, "nested"
    inner = MIMEMultipart("alternative")
    inner.attach(MIMEText("plain", "plain"))
    related = MIMEMultipart("related")
    related.attach(MIMEText("<p>html</p>", "html"))
    related.attach(MIMEApplication(EICAR, "octet-stream", Name="tool.exe"))
    inner.attach(related)
    outer.attach(inner)
    return outer.as_bytes(policy=SMTP)


async def deliver(port: int, raw: bytes) -> tuple[int, bytes]:
    return await smtp_send(port, raw.replace(b"\r\n.", b"\r\n.."), "alice@example.org", [RCPT])


@pytest.fixture
async def scanning_server(start_server, db, clamd):
    running = start_server(**{"scan.clamd": clamd.unix_address, "scan.timeout": 5})
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support")
    return running


@pytest.mark.parametrize("raw", [with_attachment(EICAR, "eicar.com", "plain"), zipped_eicar(),
                                 nested_base64_eicar()], ids=["attachment", "zip", "nested-base64"])
async def test_virus_is_refused_with_its_signature_and_not_stored(scanning_server, db, raw):
    code, line = await deliver(scanning_server.port, raw)
    assert code == 554 and enhanced(line) == "5.7.1", line
    assert REPORTED_SIGNATURE.encode() in line and b"virus found" in line
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    assert await db.fetchval("SELECT count(*) FROM blobs") == 0


async def test_clean_attachment_is_stored_as_clean(scanning_server, db):
    code, _ = await deliver(scanning_server.port, with_attachment(PDF, "report.pdf", "clean"))
    assert code == 250
    assert await db.fetchval("SELECT scan_status FROM messages") == "clean"
    assert await db.fetchval("SELECT scan_status FROM attachments") == "clean"


async def test_clamd_down_tempfails_and_recovers(scanning_server, db, clamd):
    clamd.stop()
    code, line = await deliver(scanning_server.port, with_attachment(PDF, "report.pdf", "while-down"))
    assert code == 451 and enhanced(line) == replies.TEMP_SCAN_FAILURE.enhanced, line
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    clamd.start()
    code, _ = await deliver(scanning_server.port, with_attachment(PDF, "report.pdf", "while-down"))
    assert code == 250
    assert await db.fetchval("SELECT scan_status FROM messages") == "clean"


async def test_clamd_down_with_scanning_optional_stores_unscanned(start_server, db, clamd):
    running = start_server(**{"scan.clamd": clamd.unix_address, "scan.required": False,
                              "scan.timeout": 5})
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support")
    clamd.stop()
    code, _ = await deliver(running.port, with_attachment(PDF, "report.pdf", "optional"))
    assert code == 250
    assert await db.fetchval("SELECT scan_status FROM messages") == "unscanned"


async def test_attachment_over_the_stream_limit_is_refused(start_server, db, clamd):
    running = start_server(**{"scan.clamd": clamd.unix_address, "scan.max_stream_size": 50_000})
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support")
    code, line = await deliver(running.port, with_attachment(b"A" * 60_000, "big.bin", "big"))
    assert (code, enhanced(line)) == (replies.TOO_BIG_TO_SCAN.code, replies.TOO_BIG_TO_SCAN.enhanced)
    assert await db.fetchval("SELECT count(*) FROM messages") == 0


async def test_without_a_scanner_attachments_are_marked_unscanned(server, db):
    code, _ = await deliver(server.port, with_attachment(PDF, "report.pdf", "no-scanner"))
    assert code == 250
    assert await db.fetchval("SELECT scan_status FROM messages") == "unscanned"
