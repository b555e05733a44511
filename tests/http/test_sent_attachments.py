"""Attachments sent over the API (issue 18), over real HTTP and the relay sink on loopback:
stored as attachment rows of the sent message like received ones (listed on the message,
downloadable from the attachment route), bounded by http.api_max_attachments and
http.api_max_attachment_size; drafts carry attachments that sending delivers and
discarding removes."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import aiohttp
import pytest

from tests.http.test_api import bearer
from tests.http.test_mailbox_api import call, open_mailbox, parse
from tests.outbound.conftest import relay  # noqa: F401

pytestmark = pytest.mark.timeout(120)

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8
CSV = "name,amount\nwidget,3\n".encode()


@pytest.fixture
async def mailbox(start_server, db, relay, database_url, dns_server):  # noqa: F811
    sink, url = relay
    server, keys = await open_mailbox(start_server, db, url, database_url, dns_server, **{
        "http.api_max_attachments": 2, "http.api_max_attachment_size": 4096})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        yield server, sink, keys, http, f"{server.http_url}/api/v1/workspaces/acme"


def form(*files: tuple[str, bytes, str], **fields: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in fields.items():
        data.add_field(name, value)
    for filename, content, content_type in files:
        data.add_field("attachment", content, filename=filename, content_type=content_type)
    return data


async def download(http, base, key, attachment_id) -> tuple[int, bytes, str | None]:
    async with http.get(f"{base}/attachments/{attachment_id}", headers=bearer(key)) as response:
        return response.status, await response.read(), response.headers.get("Content-Type")


async def test_sent_attachments_are_rows_of_the_message_and_downloadable(mailbox, db):
    server, sink, keys, http, base = mailbox
    status, sent, _ = await call(
        http, "POST", f"{base}/agents/support/messages", keys["send"],
        data=form(("invoice.pdf", PDF, "application/pdf"), ("items.csv", CSV, "text/csv"),
                  to="bob@example.org", subject="Invoice", text="Attached."))
    assert status == 201, sent
    listed = [(a["filename"], a["content_type"], a["size"], a["sha256"])
              for a in sent["attachments"]]
    assert listed == [("invoice.pdf", "application/pdf", len(PDF),
                       hashlib.sha256(PDF).hexdigest()),
                      ("items.csv", "text/csv", len(CSV), hashlib.sha256(CSV).hexdigest())]
    # downloadable with the route that serves received attachments, as sent
    for attachment, content in zip(sent["attachments"], (PDF, CSV)):
        got = await download(http, base, keys["read"], attachment["id"])
        assert got[0] == 200 and got[1] == content
    # the thread shows them on the outbound message too
    _, thread, _ = await call(http, "GET", f"{base}/threads/{sent['thread_id']}", keys["read"])
    assert [a["id"] for a in thread["messages"][0]["attachments"]] == [
        a["id"] for a in sent["attachments"]]
    # what left is the same bytes
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    parts = list(parse(received.data).iter_attachments())
    assert [(p.get_filename(), p.get_content_type(), p.get_payload(decode=True))
            for p in parts] == [("invoice.pdf", "application/pdf", PDF),
                                ("items.csv", "text/csv", CSV)]
    # another workspace cannot fetch them
    got = await download(http, base.replace("acme", "globex"), keys["globex"],
                         sent["attachments"][0]["id"])
    assert got[0] == 404
    # JSON with base64 content is stored the same way

    status, sent, _ = await call(http, "POST", f"{base}/agents/support/messages", keys["send"],
                                 json={"to": "bob@example.org", "text": "x", "attachments": [
                                     {"filename": "a.txt", "content_type": "text/plain",
                                      "content_base64": base64.b64encode(b"hello").decode()}]})
    assert status == 201
    [attachment] = sent["attachments"]
    assert (attachment["filename"], attachment["size"]) == ("a.txt", 5)
    assert (await download(http, base, keys["read"], attachment["id"]))[1] == b"hello"


async def test_attachment_bounds_are_refused_naming_the_key_and_store_nothing(mailbox, db):
    server, sink, keys, http, base = mailbox
    url = f"{base}/agents/support/messages"
    status, body, _ = await call(http, "POST", url, keys["send"], data=form(
        ("a.txt", b"a", "text/plain"), ("b.txt", b"b", "text/plain"),
        ("c.txt", b"c", "text/plain"), to="bob@example.org", text="three"))
    assert status == 400 and body["rule"] == "http.api_max_attachments", body
    status, body, _ = await call(http, "POST", url, keys["send"], data=form(
        ("big.bin", b"x" * 4097, "application/octet-stream"), to="bob@example.org", text="x"))
    assert status == 413 and body["rule"] == "http.api_max_attachment_size", body

    status, body, _ = await call(http, "POST", url, keys["send"], json={
        "to": "bob@example.org", "text": "x", "attachments": [
            {"filename": "big.bin", "content_type": "application/octet-stream",
             "content_base64": base64.b64encode(b"x" * 4097).decode()}]})
    assert status == 413 and body["rule"] == "http.api_max_attachment_size", body
    # exactly at the bounds: fine
    status, sent, _ = await call(http, "POST", url, keys["send"], data=form(
        ("a.bin", b"x" * 4096, "application/octet-stream"), ("b.txt", b"b", "text/plain"),
        to="bob@example.org", text="two"))
    assert status == 201 and len(sent["attachments"]) == 2
    assert await db.fetchval("SELECT count(*) FROM messages") == 1
    assert await db.fetchval("SELECT count(*) FROM attachments") == 2


async def test_a_drafts_attachments_are_sent_with_it(mailbox, db):
    server, sink, keys, http, base = mailbox
    status, draft, _ = await call(
        http, "POST", f"{base}/agents/sales/drafts", keys["send"],
        data=form(("invoice.pdf", PDF, "application/pdf"), ("old.csv", b"old", "text/csv"),
                  to="bob@example.org", subject="Quote", text="Draft."))
    assert status == 201, draft
    assert [(a["filename"], a["size"]) for a in draft["attachments"]] == [
        ("invoice.pdf", len(PDF)), ("old.csv", 3)]
    # a JSON update without attachments keeps them
    status, draft, _ = await call(http, "PATCH", f"{base}/drafts/{draft['id']}", keys["send"],
                                  json={"subject": "Your quote"})
    assert status == 200 and len(draft["attachments"]) == 2
    # a multipart update with files replaces them; its fields replace the draft's
    status, draft, _ = await call(http, "PATCH", f"{base}/drafts/{draft['id']}", keys["send"],
                                  data=form(("invoice.pdf", PDF, "application/pdf"),
                                            ("items.csv", CSV, "text/csv"), text="Final."))
    assert status == 200, draft
    assert [a["filename"] for a in draft["attachments"]] == ["invoice.pdf", "items.csv"]
    assert (draft["subject"], draft["text"], draft["to"]) == ("Your quote", "Final.",
                                                              ["bob@example.org"])
    # the replaced file's content is gone (nothing else named it)
    assert await db.fetchval("SELECT count(*) FROM blobs WHERE sha256 = $1",
                             hashlib.sha256(b"old").digest()) == 0
    _, listed, _ = await call(http, "GET", f"{base}/drafts", keys["read"])
    assert [a["filename"] for a in listed["drafts"][0]["attachments"]] == ["invoice.pdf",
                                                                           "items.csv"]
    status, sent, _ = await call(http, "POST", f"{base}/drafts/{draft['id']}/send",
                                 keys["send"])
    assert status == 201, sent
    assert [(a["filename"], a["size"]) for a in sent["attachments"]] == [
        ("invoice.pdf", len(PDF)), ("items.csv", len(CSV))]
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    mail = parse(received.data)
    assert mail["Subject"] == "Your quote"
    assert mail.get_body(("plain",)).get_content().strip() == "Final."
    assert [(p.get_filename(), p.get_payload(decode=True)) for p in mail.iter_attachments()] \
        == [("invoice.pdf", PDF), ("items.csv", CSV)]


async def test_discarding_a_draft_removes_its_attachments(mailbox, db):
    server, sink, keys, http, base = mailbox
    shared, own = b"shared between two drafts", b"only in the discarded draft"
    ids = []
    for content in (own, b""):
        files = [("shared.txt", shared, "text/plain")]
        if content:
            files.append(("own.txt", content, "text/plain"))
        status, draft, _ = await call(http, "POST", f"{base}/agents/support/drafts",
                                      keys["send"], data=form(*files, to="bob@example.org",
                                                              text="x"))
        assert status == 201, draft
        ids.append(draft["id"])
    async with http.delete(f"{base}/drafts/{ids[0]}", headers=bearer(keys["send"])) as response:
        assert response.status == 204
    assert await db.fetchval("SELECT count(*) FROM draft_attachments WHERE draft_id = $1",
                             ids[0]) == 0
    blobs = {bytes(r["sha256"]) for r in await db.fetch("SELECT sha256 FROM blobs")}
    assert hashlib.sha256(own).digest() not in blobs
    # content another draft still names stays, and that draft still sends it
    assert hashlib.sha256(shared).digest() in blobs
    status, sent, _ = await call(http, "POST", f"{base}/drafts/{ids[1]}/send", keys["send"])
    assert status == 201, sent
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    assert [p.get_payload(decode=True) for p in parse(received.data).iter_attachments()] == [
        shared]
    await asyncio.sleep(0.3)
    assert len(sink.received) == 1
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 1


async def test_a_drafts_own_attachment_is_downloadable_by_read_keys_only_in_its_workspace(
        mailbox, db):
    server, sink, keys, http, base = mailbox
    status, draft, _ = await call(
        http, "POST", f"{base}/agents/support/drafts", keys["send"],
        data=form(("quote.pdf", PDF, "application/pdf"), ("evil.html", b"<script>x</script>",
                                                          "text/html"),
                  to="bob@example.org", text="Your quote."))
    assert status == 201, draft
    pdf, page = draft["attachments"]
    status, other, _ = await call(http, "POST", f"{base}/agents/sales/drafts", keys["send"],
                                  data=form(("items.csv", CSV, "text/csv"),
                                            to="bob@example.org", text="Items."))
    assert status == 201, other

    async def get(url: str, key: str | None):
        async with http.get(url, headers=bearer(key) if key else {}) as response:
            return response.status, await response.read(), response.headers

    url = f"{base}/drafts/{draft['id']}/attachments"
    status, body, headers = await get(f"{url}/{pdf['id']}", keys["read"])
    assert status == 200 and body == PDF
    assert headers["Content-Type"] == "application/pdf"
    assert headers["Content-Disposition"].startswith('attachment; filename="quote.pdf"')
    # sender-chosen HTML is served as a download the browser never runs on our origin
    status, body, headers = await get(f"{url}/{page['id']}", keys["read"])
    assert status == 200 and body == b"<script>x</script>"
    assert headers["Content-Security-Policy"] == "sandbox"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Disposition"].startswith("attachment;")
    # only the draft's own: another draft's attachment id under this draft is not found
    status, body, _ = await get(f"{url}/{other['attachments'][0]['id']}", keys["read"])
    assert status == 404 and CSV not in body
    # scope: read; isolation: another workspace's key, on acme's path and on its own
    status, body, _ = await get(f"{url}/{pdf['id']}", keys["send"])
    assert status == 403 and PDF not in body
    globex = f"{server.http_url}/api/v1/workspaces/globex/drafts/{draft['id']}/attachments"
    for path in (f"{url}/{pdf['id']}", f"{globex}/{pdf['id']}"):
        status, body, _ = await get(path, keys["globex"])
        assert status == 404 and PDF not in body, path
    status, _, _ = await get(f"{url}/{pdf['id']}", None)
    assert status == 401
    # discarded, its attachments are gone with it
    async with http.delete(f"{base}/drafts/{draft['id']}",
                           headers=bearer(keys["send"])) as response:
        assert response.status == 204
    status, _, _ = await get(f"{url}/{pdf['id']}", keys["read"])
    assert status == 404
