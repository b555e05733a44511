"""Mail in over real SMTP, out of real Postgres: threads, messages, attachments, isolation."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid

import aiosmtplib
import pytest

from smtpd_agent.store import directory, inbox
from tests.support import IN_CI, enhanced

PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
CSV = "name,qty\nwidget,3\n".encode()


def two_attachment_message(to: str, subject: str = "Order question",
                           sender: str = "alice@example.org", **headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Alice <{sender}>"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="example.org")
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content("Hello, où est ma commande ?\n")
    message.add_alternative("<p>Hello, <b>où</b> est ma commande ?</p>", subtype="html")
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice.pdf")
    message.add_attachment(CSV, maintype="text", subtype="csv", filename="order.csv")
    return message


def wire_bytes(message: EmailMessage) -> bytes:
    return message.as_bytes(policy=SMTP)


async def send(port: int, message: EmailMessage | bytes, rcpts: list[str] | None = None,
               sender: str = "alice@example.org") -> tuple[dict, str]:
    if isinstance(message, EmailMessage):
        rcpts = rcpts or [message["To"]]
        message = wire_bytes(message)
    return await aiosmtplib.send(message, hostname="127.0.0.1", port=port, sender=sender,
                                 recipients=rcpts, start_tls=False, use_tls=False)


async def test_aiosmtplib_delivery_stores_thread_message_and_attachments(server, db, domain):
    address = f"support@acme.{domain}"
    message = two_attachment_message(address)
    raw = wire_bytes(message)
    errors, reply = await send(server.port, raw, rcpts=[address])
    assert errors == {}
    assert reply.startswith("2.0.0") and reply.endswith("queued")

    row = await db.fetchrow("SELECT *, messages.raw FROM messages")
    assert row["message_id"] == message["Message-ID"]
    assert row["subject"] == "Order question"
    assert row["from_address"] == "alice@example.org"
    assert row["mail_from"] == "alice@example.org"
    assert row["rcpt_to"] == address
    assert row["helo"] and str(row["client_ip"]) == "127.0.0.1"
    assert row["tls"] is False
    assert "où est ma commande" in row["text_body"]
    assert "<b>où</b>" in row["html_body"]
    assert row["direction"] == "inbound"
    assert row["raw"].startswith(b"Authentication-Results: mx.test.local;")
    assert b"\r\nReceived: from " in row["raw"]
    assert row["raw"].endswith(b"\r\n" + raw)
    assert row["size"] == len(row["raw"])
    assert row["queue_id"] and reply.split()[1] == row["queue_id"]

    thread = await db.fetchrow("SELECT * FROM threads WHERE id = $1", row["thread_id"])
    assert thread["subject"] == "Order question" and thread["message_count"] == 1
    assert thread["workspace_id"] == row["workspace_id"]

    attachments = await db.fetch(
        "SELECT a.*, b.content FROM attachments a JOIN blobs b USING (workspace_id, sha256) "
        "WHERE a.message_id = $1 ORDER BY position", row["id"])
    assert [(a["filename"], a["content_type"], a["size"]) for a in attachments] == [
        ("invoice.pdf", "application/pdf", len(PDF)), ("order.csv", "text/csv", len(CSV))]
    assert [bytes(a["sha256"]) for a in attachments] == [hashlib.sha256(PDF).digest(),
                                                         hashlib.sha256(CSV).digest()]
    assert [bytes(a["content"]) for a in attachments] == [PDF, CSV]


@pytest.mark.skipif(shutil.which("swaks") is None and not IN_CI, reason="swaks not installed")
async def test_swaks_delivery_with_two_attachments(server, db, domain, tmp_path):
    first, second = tmp_path / "report.pdf", tmp_path / "data.csv"
    first.write_bytes(PDF)
    second.write_bytes(CSV)
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--to", f"support@acme.{domain}",
         "--from", "bob@example.net", "--header", "Subject: from swaks",
         "--attach", f"@{first}", "--attach", f"@{second}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0" in result.stdout
    row = await db.fetchrow("SELECT * FROM messages WHERE subject = 'from swaks'")
    assert row["mail_from"] == "bob@example.net"
    contents = await db.fetch(
        "SELECT b.content FROM attachments a JOIN blobs b USING (workspace_id, sha256) "
        "WHERE a.message_id = $1 ORDER BY position", row["id"])
    assert [bytes(c["content"]) for c in contents] == [PDF, CSV]


async def test_reply_with_in_reply_to_joins_the_thread(server, db, domain):
    address = f"support@acme.{domain}"
    first = two_attachment_message(address)
    await send(server.port, first)
    reply = two_attachment_message(address, subject="Something else entirely",
                                   In_Reply_To=first["Message-ID"])
    await send(server.port, reply)
    rows = await db.fetch("SELECT thread_id FROM messages ORDER BY id")
    assert len(rows) == 2 and rows[0]["thread_id"] == rows[1]["thread_id"]
    assert await db.fetchval("SELECT message_count FROM threads") == 2


async def test_subject_threading_needs_the_same_correspondent(server, db, domain):
    address = f"support@acme.{domain}"
    await send(server.port, two_attachment_message(address, subject="Invoice 42"))
    await send(server.port, two_attachment_message(address, subject="RE: Fwd: invoice  42"))
    await send(server.port, two_attachment_message(address, subject="Re: Invoice 42",
                                                   sender="mallory@example.com"),
               sender="mallory@example.com")
    rows = await db.fetch("SELECT thread_id, from_address FROM messages ORDER BY id")
    assert rows[0]["thread_id"] == rows[1]["thread_id"]
    assert rows[2]["thread_id"] != rows[0]["thread_id"]


async def test_message_sent_twice_is_stored_once(server, db, domain):
    message = two_attachment_message(f"support@acme.{domain}")
    _, first = await send(server.port, message)
    _, second = await send(server.port, message)
    assert first.startswith("2.0.0") and second.startswith("2.0.0")
    assert await db.fetchval("SELECT count(*) FROM messages") == 1
    assert await db.fetchval("SELECT count(*) FROM attachments") == 2
    assert await db.fetchval("SELECT message_count FROM threads") == 1


async def test_identical_attachments_share_one_blob(server, db, domain):
    message = two_attachment_message(f"support@acme.{domain}")
    await send(server.port, message)
    del message["Message-ID"]
    message["Message-ID"] = make_msgid(domain="example.org")
    await send(server.port, message)
    assert await db.fetchval("SELECT count(*) FROM attachments") == 4
    assert await db.fetchval("SELECT count(*) FROM blobs") == 2


async def test_one_message_to_two_workspaces_is_stored_once_in_each(server, db, domain):
    acme, globex = f"support@acme.{domain}", f"support@globex.{domain}"
    message = two_attachment_message(f"{acme}, {globex}")
    errors, _ = await send(server.port, message, rcpts=[acme, globex])
    assert errors == {}
    rows = await db.fetch("SELECT m.id, m.workspace_id, w.slug FROM messages m "
                          "JOIN workspaces w ON w.id = m.workspace_id ORDER BY w.slug")
    assert [r["slug"] for r in rows] == ["acme", "globex"]
    # each copy, its thread and its attachments belong to its own workspace only
    for row in rows:
        assert await db.fetchval("SELECT count(*) FROM attachments WHERE message_id = $1 "
                                 "AND workspace_id <> $2", row["id"], row["workspace_id"]) == 0
    acme_agent = await directory.get_agent(db, "acme", "support")
    globex_agent = await directory.get_agent(db, "globex", "support")
    acme_view = await inbox.agent_inbox(db, acme_agent)
    globex_view = await inbox.agent_inbox(db, globex_agent)
    assert [m["id"] for t in acme_view for m in t["messages"]] == [rows[0]["id"]]
    assert [m["id"] for t in globex_view for m in t["messages"]] == [rows[1]["id"]]


async def test_two_addresses_of_one_mailbox_store_one_copy(server, db, domain):
    plain, tagged = f"support@acme.{domain}", f"Support+orders@ACME.{domain}"
    errors, _ = await send(server.port, two_attachment_message(plain), rcpts=[plain, tagged])
    assert errors == {}
    assert await db.fetchval("SELECT count(*) FROM messages") == 1


async def test_disabled_agent_stops_receiving(server, db, domain):
    await directory.set_agent_enabled(db, "acme", "sales", False)
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port)
    await smtp.connect()
    await smtp.ehlo()
    await smtp.mail("alice@example.org")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await smtp.rcpt(f"sales@acme.{domain}")
    assert refused.value.code == 550 and refused.value.message.startswith("5.1.1")
    await smtp.quit()


async def test_ehlo_advertises_the_extensions(server):
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port)
    await smtp.connect()
    response = await smtp.ehlo()
    for extension in ("size", "8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes",
                      "chunking"):
        assert extension in smtp.esmtp_extensions, response.message
    assert smtp.esmtp_extensions["size"] == str(server.settings.smtp.max_message_size)
    assert "starttls" not in smtp.esmtp_extensions
    noop = await smtp.noop()
    assert enhanced(f"{noop.code} {noop.message}".encode()) == "2.0.0"
    await smtp.quit()
