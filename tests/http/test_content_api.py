"""Content an LLM can use, over real SMTP and HTTP: extracted_text of replies written the
way common clients write them, and an attachment's text on request (text, PDF), bounded,
isolated per workspace, and a hostile PDF refused within its deadline."""

from __future__ import annotations

import asyncio
import time
from email.message import EmailMessage
from email.policy import SMTP

import structlog

from smtpd_agent.store import directory
from smtpd_agent.store.apikeys import Scope, create_key
from tests.http.test_api import bearer, deliver
from tests.pdf import pdf_bomb, pdf_of_pages
from tests.replies import APPLE, QUOTED, REPLIES, Reply



def reply_mail(reply: Reply, number: int) -> bytes:
    mail = EmailMessage()
    mail["From"] = "Alice <alice@example.org>"
    mail["To"] = "support@acme.agents.test"
    mail["Subject"] = f"Re: question {number}"
    mail["Message-ID"] = f"<reply-{number}@example.org>"
    if reply.text is not None:
        mail.set_content(reply.text)
    else:
        mail.set_content(reply.html or "", subtype="html")
    return mail.as_bytes(policy=SMTP)


def with_attachments(*parts: tuple[str, str, bytes]) -> bytes:
    mail = EmailMessage()
    mail["From"] = "Alice <alice@example.org>"
    mail["To"] = "support@acme.agents.test"
    mail["Subject"] = "files"
    mail["Message-ID"] = f"<files-{time.monotonic_ns()}@example.org>"
    mail.set_content("see the files\n")
    for filename, content_type, content in parts:
        maintype, subtype = content_type.split("/")
        mail.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    return mail.as_bytes(policy=SMTP)


async def workspaces(db) -> None:
    await directory.add_workspace(db, "acme", "Acme Inc")
    await directory.add_workspace(db, "globex", "Globex")
    await directory.add_agent(db, "acme", "support")
    await directory.add_agent(db, "globex", "support")


async def test_extracted_text_of_common_clients_holds_only_the_new_text(server, keys, http, db):
    for number, reply in enumerate(REPLIES):
        assert await asyncio.to_thread(deliver, server.port, reply_mail(reply, number)) == 250
    base = f"{server.http_url}/api/v1/workspaces/acme"
    rows = await db.fetch("SELECT id, thread_id, subject, text_body, html_body, extracted_text "
                          "FROM messages ORDER BY id")
    assert len(rows) == len(REPLIES)
    for reply, row in zip(REPLIES, rows, strict=True):
        async with http.get(f"{base}/threads/{row['thread_id']}",
                            headers=bearer(keys.acme)) as response:
            assert response.status == 200
            [shown] = (await response.json())["messages"]
        extracted = shown["extracted_text"]
        assert extracted == row["extracted_text"], reply.client
        assert reply.new in extracted and QUOTED not in extracted, (reply.client, extracted)
        if reply is not APPLE:
            assert extracted == reply.new, reply.client
        # the bodies themselves are stored as they came, quotes and all
        assert QUOTED in (row["text_body"] or row["html_body"]) or reply.client == "no quotes"


async def test_a_failed_extraction_stores_the_plain_body_and_says_so(start_server, db):
    server = start_server(**{"content.extract_timeout": 1e-9, "content.extract_max_chars": 3000})
    await workspaces(db)
    body = "Thanks!\n\nOn Mon, Alice wrote:\n" + f"> {QUOTED} old line of the history\n" * 200
    mail = reply_mail(Reply("long", "Thanks!", text=body), 99)
    with structlog.testing.capture_logs() as events:
        assert await asyncio.to_thread(deliver, server.port, mail) == 250
    row = await db.fetchrow("SELECT text_body, extracted_text FROM messages")
    assert QUOTED in row["extracted_text"] and len(row["extracted_text"]) == 3000
    assert row["text_body"].startswith(row["extracted_text"])
    [failed] = [e for e in events if e["event"] == "content.extract_failed"]
    assert failed["reason"] == "timeout" and failed["log_level"] == "warning"


async def test_attachment_text_for_text_and_pdf_bounded_and_isolated(start_server, db, http):
    server = start_server(**{"content.attachment_max_chars": 2000, "content.pdf_max_pages": 3,
                             "content.pdf_timeout": 20.0})
    await workspaces(db)
    acme_key = (await create_key(db, "acme")).key
    globex_key = (await create_key(db, "globex")).key
    send_only = (await create_key(db, "acme", scopes=frozenset({Scope.SEND}))).key
    invoice = pdf_of_pages(["Invoice 2026-114 total 120.00 EUR", "Page two of the invoice"])
    big_pdf = pdf_of_pages([f"Page {n} of the long report" for n in range(1, 11)])
    raw = with_attachments(
        ("notes.txt", "text/plain", "Grüße aus Köln\nline two\n".encode()),
        ("invoice.pdf", "application/pdf", invoice),
        ("long.pdf", "application/pdf", big_pdf),
        ("big.csv", "text/csv", b"a,b,c\n" * 10_000),
        ("photo.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
        ("broken.pdf", "application/pdf", b"%PDF-1.4\nthis is not a PDF at all\n%%EOF\n"))
    assert await asyncio.to_thread(deliver, server.port, raw) == 250
    ids = {r["filename"]: r["id"] for r in await db.fetch("SELECT id, filename FROM attachments")}
    base = f"{server.http_url}/api/v1/workspaces/acme/attachments"

    async def text_of(name: str, key: str = acme_key, prefix: str = base):
        async with http.get(f"{prefix}/{ids[name]}/text", headers=bearer(key)) as response:
            return response.status, await response.json()

    status, notes = await text_of("notes.txt")
    assert status == 200
    assert notes["text"] == "Grüße aus Köln\nline two\n" and notes["truncated"] is False
    assert (notes["filename"], notes["content_type"]) == ("notes.txt", "text/plain")
    status, pdf = await text_of("invoice.pdf")
    assert status == 200, pdf
    assert "Invoice 2026-114 total 120.00 EUR" in pdf["text"]
    assert "Page two of the invoice" in pdf["text"]
    assert (pdf["pages"], pdf["page_count"], pdf["truncated"]) == (2, 2, False)
    status, long = await text_of("long.pdf")
    assert status == 200
    assert (long["pages"], long["page_count"], long["truncated"]) == (3, 10, True)
    assert "Page 3 of" in long["text"] and "Page 4 of" not in long["text"]
    status, csv = await text_of("big.csv")
    assert status == 200 and len(csv["text"]) == 2000 and csv["truncated"] is True
    status, png = await text_of("photo.png")
    assert status == 415 and "image/png" in png["error"]
    status, broken = await text_of("broken.pdf")
    assert status == 422 and "PDF" in broken["error"]

    # another workspace: its key on acme's path, and its own path with acme's id
    status, refused = await text_of("invoice.pdf", globex_key)
    assert status == 404 and "Invoice" not in str(refused)
    status, refused = await text_of("invoice.pdf", globex_key,
                                    f"{server.http_url}/api/v1/workspaces/globex/attachments")
    assert status == 404 and refused == {"error": "no such attachment"}
    status, refused = await text_of("invoice.pdf", send_only)
    assert status == 403 and "scope" in refused["error"] and "Invoice" not in str(refused)
    async with http.get(f"{base}/{ids['notes.txt']}/text") as response:
        assert response.status == 401


async def test_a_hostile_pdf_is_refused_within_its_deadline(start_server, db, http):
    server = start_server(**{"content.pdf_timeout": 2.0})
    await workspaces(db)
    key = (await create_key(db, "acme")).key
    raw = with_attachments(("bomb.pdf", "application/pdf", pdf_bomb()),
                           ("ok.txt", "text/plain", b"still served"))
    assert await asyncio.to_thread(deliver, server.port, raw) == 250
    ids = {r["filename"]: r["id"] for r in await db.fetch("SELECT id, filename FROM attachments")}
    base = f"{server.http_url}/api/v1/workspaces/acme/attachments"
    began = time.monotonic()
    with structlog.testing.capture_logs() as events:
        async with http.get(f"{base}/{ids['bomb.pdf']}/text", headers=bearer(key)) as response:
            assert response.status == 422
            assert "longer than 2 s" in (await response.json())["error"]
    assert time.monotonic() - began < 2.0 + 3.0  # the deadline, plus the request around it
    assert any(e["event"] == "attachment_text.pdf_timeout" for e in events)
    async with http.get(f"{base}/{ids['ok.txt']}/text", headers=bearer(key)) as response:
        assert response.status == 200 and (await response.json())["text"] == "still served"
