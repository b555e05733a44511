"""The scanning stage against a real clamd over its real sockets (no fakes)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import zipfile
from datetime import UTC, datetime
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from structlog.testing import capture_logs

from smtpd_agent.config import ScanSettings
from smtpd_agent.message import parse_message
from smtpd_agent.record import Envelope, InboundMessage, Mailbox, Recipient
from smtpd_agent.scan import ScanDecision, Scanner, decide
from tests.clamd import EICAR, REPORTED_SIGNATURE, STREAM_MAX_LENGTH, Clamd

PDF = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
       b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\n"
       b"trailer << /Root 1 0 R >>\n%%EOF\n")


# --- messages, built with the email package -------------------------------------------------

def inbound(msg: EmailMessage | MIMEMultipart) -> InboundMessage:
    raw = msg.as_bytes()
    mailbox = Mailbox(workspace_id=1, workspace_slug="acme", agent_id=1, handle="support",
                      domain="acme.aexy.email")
    envelope = Envelope(session_id="test-session", client_ip="192.0.2.1", helo="mx.example.org",
                        mail_from="sender@example.org",
                        recipients=(Recipient(address=mailbox.address, mailbox=mailbox),),
                        received_at=datetime.now(UTC))
    return InboundMessage(envelope=envelope, raw=raw, parsed=parse_message(raw))


def with_attachments(*attachments: tuple[bytes, str, str],
                     body: str = "see attached") -> InboundMessage:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "support@acme.aexy.email"
    msg["Subject"] = "attachments"
    msg["Message-ID"] = "<scan-test@example.org>"
    msg.set_content(body)
    for content, maintype_subtype, filename in attachments:
        maintype, subtype = maintype_subtype.split("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    return inbound(msg)


def zipped(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, content)
    return buffer.getvalue()


def nested_multipart_with_base64_eicar() -> InboundMessage:
    """mixed -> (alternative text/html, mixed -> (text, base64 application/octet-stream))."""
    outer = MIMEMultipart("mixed")
    outer["From"] = "sender@example.org"
    outer["To"] = "support@acme.aexy.email"
    outer["Subject"] = "nested"
    alternative = MIMEMultipart("alternative")
    alternative.attach(MIMEText("plain body", "plain"))
    alternative.attach(MIMEText("<p>html body</p>", "html"))
    outer.attach(alternative)
    inner = MIMEMultipart("mixed")
    inner.attach(MIMEText("forwarded note", "plain"))
    part = MIMEApplication(EICAR, "octet-stream")  # base64 by default
    part.add_header("Content-Disposition", "attachment", filename="invoice.bin")
    inner.attach(part)
    outer.attach(inner)
    return inbound(outer)


def plain(body: str) -> InboundMessage:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "support@acme.aexy.email"
    msg["Subject"] = "no attachments"
    msg.set_content(body)
    return inbound(msg)


# --- infected and clean ---------------------------------------------------------------------

async def test_eicar_attachment_is_infected_and_rejected(scanner: Scanner) -> None:
    message = with_attachments((PDF, "application/pdf", "report.pdf"),
                               (EICAR, "application/octet-stream", "eicar.com"))
    result = await scanner.scan_message(message)
    assert result.status == "infected"
    assert result.signature == REPORTED_SIGNATURE
    assert [(a.filename, a.status, a.signature) for a in result.attachments] == [
        ("report.pdf", "clean", None), ("eicar.com", "infected", REPORTED_SIGNATURE)]
    assert decide(result, scanner.settings) == ScanDecision("reject", "virus", REPORTED_SIGNATURE)


async def test_eicar_inside_zip_is_infected(scanner: Scanner) -> None:
    archive = zipped("readme.txt", EICAR)
    assert EICAR not in archive  # deflated: only clamd's unpacking can find it
    result = await scanner.scan_message(
        with_attachments((archive, "application/zip", "docs.zip")))
    assert (result.status, result.signature) == ("infected", REPORTED_SIGNATURE)
    assert result.attachments[0].status == "infected"
    assert decide(result, scanner.settings).action == "reject"


async def test_eicar_base64_in_nested_multipart_is_infected(scanner: Scanner) -> None:
    message = nested_multipart_with_base64_eicar()
    assert EICAR not in message.raw
    result = await scanner.scan_message(message)
    assert (result.status, result.signature) == ("infected", REPORTED_SIGNATURE)
    infected = [a for a in result.attachments if a.status == "infected"]
    assert [a.filename for a in infected] == ["invoice.bin"]
    # clamd's own MIME decoding of the raw message finds it too.
    assert result.raw is not None and result.raw.status == "infected"


async def test_clean_pdf_attachment_is_clean(scanner: Scanner) -> None:
    result = await scanner.scan_message(with_attachments((PDF, "application/pdf", "report.pdf")))
    assert result.status == "clean"
    assert result.signature is None
    assert [(a.content_type, a.status, a.size) for a in result.attachments] == [
        ("application/pdf", "clean", len(PDF))]
    assert decide(result, scanner.settings) == ScanDecision("accept", "clean")


async def test_message_without_attachments_is_not_scanned_unless_scan_all(
        scan_settings: ScanSettings) -> None:
    # EICAR in the text body: only the whole-message stream can see it.
    message = plain(EICAR.decode())
    skipped = await Scanner(scan_settings).scan_message(message)
    assert skipped.status == "skipped"
    assert decide(skipped, scan_settings) == ScanDecision("accept", "not_scanned")
    everything = dataclasses.replace(scan_settings, scan_all=True)
    result = await Scanner(everything).scan_message(message)
    assert (result.status, result.signature) == ("infected", REPORTED_SIGNATURE)
    assert (await Scanner(everything).scan_message(plain("hello"))).status == "clean"


async def test_tcp_address(clamd: Clamd) -> None:
    scanner = Scanner(ScanSettings(clamd=clamd.tcp_address, timeout=5.0))
    result = await scanner.scan_message(
        with_attachments((zipped("x.txt", EICAR), "application/zip", "x.zip")))
    assert (result.status, result.signature) == ("infected", REPORTED_SIGNATURE)
    assert (await scanner.health()).ready


async def test_identical_attachments_are_scanned_once_and_reported_each(scanner: Scanner) -> None:
    message = with_attachments((EICAR, "application/octet-stream", "a.com"),
                               (EICAR, "application/octet-stream", "b.com"))
    result = await scanner.scan_message(message)
    assert [a.status for a in result.attachments] == ["infected", "infected"]
    assert result.attachments[0].sha256 == result.attachments[1].sha256


# --- clamd down, slow, and back -------------------------------------------------------------

async def test_clamd_stopped_tempfails_then_recovers_without_restart(
        clamd: Clamd, scanner: Scanner, scan_settings: ScanSettings) -> None:
    message = with_attachments((PDF, "application/pdf", "report.pdf"))
    assert (await scanner.scan_message(message)).status == "clean"
    assert (await scanner.health()).ready

    clamd.stop()
    result = await scanner.scan_message(message)
    assert (result.status, result.problem) == ("unscanned", "connect_failed")
    assert [a.status for a in result.attachments] == ["unscanned"]
    assert decide(result, scan_settings) == ScanDecision("tempfail", "scanner_unavailable")
    optional = dataclasses.replace(scan_settings, required=False)
    assert decide(result, optional) == ScanDecision("accept_unscanned", "scanner_unavailable")
    health = await scanner.health()
    assert (health.ready, health.problem) == (False, "connect_failed")

    clamd.start()
    assert (await scanner.scan_message(message)).status == "clean"
    infected = await scanner.scan_message(
        with_attachments((EICAR, "application/octet-stream", "eicar.com")))
    assert infected.status == "infected"
    assert (await scanner.health()).ready


async def test_hung_clamd_times_out_within_the_deadline(
        clamd: Clamd, scan_settings: ScanSettings) -> None:
    scanner = Scanner(dataclasses.replace(scan_settings, timeout=0.5))
    clamd.pause()
    try:
        # A stopped clamd never answers: only the scanner's deadline can end the scan (the
        # outer guard turns a missing deadline into a clear failure, not a hang).
        async with asyncio.timeout(60):
            result = await scanner.scan_message(
                with_attachments((PDF, "application/pdf", "r.pdf")))
            health = await scanner.health(timeout=0.3)
    finally:
        clamd.resume()
    assert (result.status, result.problem) == ("unscanned", "timeout")
    assert decide(result, scanner.settings).action == "tempfail"
    assert (health.ready, health.problem) == (False, "timeout")
    assert (await scanner.scan_message(
        with_attachments((PDF, "application/pdf", "r.pdf")))).status == "clean"


async def test_clamd_crash_mid_scan_is_unscanned_not_clean(
        clamd: Clamd, scan_settings: ScanSettings) -> None:
    scanner = Scanner(scan_settings)
    clamd.pause()
    scan = asyncio.create_task(
        scanner.scan_message(with_attachments((PDF, "application/pdf", "r.pdf"))))
    await asyncio.sleep(0.2)  # connected and sent, waiting for the reply
    clamd.kill()
    result = await scan
    assert (result.status, result.problem) == ("unscanned", "io_error")
    assert decide(result, scan_settings) == ScanDecision("tempfail", "scanner_unavailable")
    clamd.start()
    assert (await scanner.scan_message(
        with_attachments((PDF, "application/pdf", "r.pdf")))).status == "clean"


# --- size limits: rejected, never passed --------------------------------------------------

@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_attachment_over_clamd_stream_limit_is_rejected(
        clamd: Clamd, scan_settings: ScanSettings, transport: str) -> None:
    """clamd's StreamMaxLength (2 MiB here) below scan.max_stream_size: clamd refuses.

    clamd answers and closes while we are still sending; the reply must be read
    anyway (over TCP the close arrives as a reset).
    """
    assert scan_settings.max_stream_size > STREAM_MAX_LENGTH
    if transport == "tcp":
        scan_settings = dataclasses.replace(scan_settings, clamd=clamd.tcp_address)
    big = os.urandom(STREAM_MAX_LENGTH + 512 * 1024)
    result = await Scanner(scan_settings).scan_message(
        with_attachments((big, "application/octet-stream", "big.bin")))
    assert (result.status, result.problem) == ("error", "too_large")
    assert result.attachments[0].problem == "too_large"
    for required in (True, False):
        settings = dataclasses.replace(scan_settings, required=required)
        assert decide(result, settings) == ScanDecision("reject", "too_large")


async def test_attachment_over_max_stream_size_is_rejected_without_sending(
        clamd: Clamd, scan_settings: ScanSettings) -> None:
    settings = dataclasses.replace(scan_settings, max_stream_size=100_000)
    clamd.stop()  # proves nothing is sent: an unreachable clamd would say unscanned
    result = await Scanner(settings).scan_message(
        with_attachments((os.urandom(150_000), "application/octet-stream", "big.bin")))
    assert (result.status, result.problem) == ("error", "too_large")
    assert decide(result, settings) == ScanDecision("reject", "too_large")


# --- logs, concurrency ----------------------------------------------------------------------

async def test_infected_log_names_signature_and_envelope_never_the_body(scanner: Scanner) -> None:
    with capture_logs() as logs:
        await scanner.scan_message(with_attachments((EICAR, "application/octet-stream", "e.com")))
    [event] = [e for e in logs if e["event"] == "scan.infected"]
    assert event["signature"] == REPORTED_SIGNATURE
    assert event["mail_from"] == "sender@example.org"
    assert event["rcpt_to"] == ["support@acme.aexy.email"]
    assert event["infected_attachments"] == [0]
    assert all("EICAR" not in str(value) for e in logs for value in e.values())


async def test_concurrent_scans_share_one_scanner(scanner: Scanner) -> None:
    messages = [with_attachments((EICAR if i % 3 == 0 else PDF, "application/octet-stream",
                                  f"f{i}.bin")) for i in range(30)]
    results = await asyncio.gather(*(scanner.scan_message(m) for m in messages))
    assert [r.status for r in results] == [
        "infected" if i % 3 == 0 else "clean" for i in range(30)]
