"""The inbox API over real HTTP: exactly what SMTP stored, scoped to the key's workspace."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from email.message import EmailMessage
from email.policy import SMTP

import pytest

from smtpd_agent.store.apikeys import hash_key
from tests.support import send_one

PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def message(subject: str, *, attachment: bool = False, html: bool = False) -> bytes:
    mail = EmailMessage()
    mail["From"] = "Alice <alice@example.org>"
    mail["To"] = "support@acme.agents.test"
    mail["Subject"] = subject
    mail["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    mail.set_content(f"body of {subject}\n")
    if html:
        mail.add_alternative(f"<p>body of {subject}</p>", subtype="html")
    if attachment:
        mail.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice.pdf")
    return mail.as_bytes(policy=SMTP)


def deliver(port: int, raw: bytes, rcpt: str = "support@acme.agents.test") -> int:
    return send_one(port, raw.replace(b"\r\n.", b"\r\n.."), "alice@example.org", rcpt,
                    ehlo="client.example.org")[0]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_inbox_api_returns_what_smtp_stored(server, keys, http, db):
    raw = message("invoice attached", attachment=True, html=True)
    assert await asyncio.to_thread(deliver, server.port, raw) == 250
    base = f"{server.http_url}/api/v1/workspaces/acme"
    auth = bearer(keys.acme)

    async with http.get(f"{base}/agents", headers=auth) as response:
        assert response.status == 200
        agents = (await response.json())["agents"]
    assert [a["handle"] for a in agents] == ["sales", "support"]

    async with http.get(f"{base}/agents/support/inbox", headers=auth) as response:
        page = await response.json()
    assert response.status == 200 and page["next_cursor"] is None
    [thread] = page["threads"]
    assert thread["subject"] == "invoice attached" and thread["message_count"] == 1

    async with http.get(f"{base}/threads/{thread['id']}", headers=auth) as response:
        assert response.status == 200
        detail = await response.json()
    [stored] = detail["messages"]
    row = await db.fetchrow("SELECT *, messages.raw FROM messages WHERE id = $1", stored["id"])
    for column in ("subject", "from_header", "text_body", "html_body", "spf", "dkim", "dmarc",
                   "arc", "scan_status", "quarantined", "message_id", "auth_results"):
        assert stored[column] == row[column], column
    assert stored["text_body"].strip() == "body of invoice attached"
    assert ["Subject", "invoice attached"] in stored["headers"]
    [attachment] = stored["attachments"]
    assert attachment["filename"] == "invoice.pdf" and attachment["size"] == len(PDF)

    async with http.get(f"{base}/messages/{stored['id']}/raw", headers=auth) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "message/rfc822"
        assert await response.read() == bytes(row["raw"])
    async with http.get(f"{base}/attachments/{attachment['id']}", headers=auth) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/pdf"
        assert "invoice.pdf" in response.headers["Content-Disposition"]
        assert await response.read() == PDF


async def test_inbox_is_paginated_newest_first_with_a_cursor(server, keys, http, db):
    for n in range(5):
        assert await asyncio.to_thread(deliver, server.port, message(f"subject {n}")) == 250
    url = f"{server.http_url}/api/v1/workspaces/acme/agents/support/inbox"
    subjects, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        async with http.get(url, headers=bearer(keys.acme), params=params) as response:
            assert response.status == 200
            page = await response.json()
        assert len(page["threads"]) <= 2
        subjects += [t["subject"] for t in page["threads"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert subjects == [f"subject {n}" for n in reversed(range(5))]
    for bad in ({"limit": "0"}, {"limit": "x"}, {"cursor": "not-a-cursor"}):
        async with http.get(url, headers=bearer(keys.acme), params=bad) as response:
            assert response.status == 400, bad


async def test_cross_workspace_is_not_found_and_keys_are_required(server, keys, http, db):
    assert await asyncio.to_thread(deliver, server.port, message("secret", attachment=True)) \
        == 250
    ids = await db.fetchrow(
        """SELECT m.id AS message, m.thread_id AS thread, a.id AS attachment
           FROM messages m JOIN attachments a ON a.message_id = m.id""")
    acme = f"{server.http_url}/api/v1/workspaces/acme"
    globex = f"{server.http_url}/api/v1/workspaces/globex"
    paths = ["agents", "agents/support/inbox", f"threads/{ids['thread']}",
             f"messages/{ids['message']}/raw", f"attachments/{ids['attachment']}"]
    for path in paths:
        # globex's key, acme's path: 404, as if nothing were there
        async with http.get(f"{acme}/{path}", headers=bearer(keys.globex)) as response:
            assert response.status == 404, path
        # globex's key, globex's path, acme's row ids: not found either
        if not path.startswith("agents"):
            async with http.get(f"{globex}/{path}", headers=bearer(keys.globex)) as response:
                assert response.status == 404, path
        async with http.get(f"{acme}/{path}") as response:
            assert response.status == 401 and "Bearer" in response.headers["WWW-Authenticate"]
        async with http.get(f"{acme}/{path}", headers=bearer("sak_forged")) as response:
            assert response.status == 401, path
        async with http.get(f"{acme}/{path}", headers=bearer(keys.acme)) as response:
            assert response.status == 200, path


async def test_keys_are_stored_hashed(server, keys, db):
    rows = await db.fetch("""SELECT w.slug, k.key_hash, k.prefix FROM api_keys k
                             JOIN workspaces w ON w.id = k.workspace_id ORDER BY w.slug""")
    assert [(r["slug"], bytes(r["key_hash"])) for r in rows] == [
        ("acme", hash_key(keys.acme)), ("globex", hash_key(keys.globex))]
    for row, key in zip(rows, (keys.acme, keys.globex), strict=True):
        stored = bytes(row["key_hash"])
        # a one-way hash, never the key or its secret part; the prefix only names it
        assert key.encode() not in stored and key[len(row["prefix"]):].encode() not in stored
        assert len(stored) == 32 and stored != key.encode()[:32]
        assert key.startswith(row["prefix"]) and len(row["prefix"]) < 12


@pytest.mark.timeout(120)
async def test_apikey_create_prints_a_working_key_once(server, http, database_url, tmp_path):
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "smtpd_agent", "apikey", "create",
                         "--workspace", "globex", "--state-dir", str(tmp_path / "cli")],
        env={"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("sak_") and "\n" not in key and "shown once" in result.stderr
    async with http.get(f"{server.http_url}/api/v1/workspaces/globex/agents",
                        headers=bearer(key)) as response:
        assert response.status == 200
        assert [a["handle"] for a in (await response.json())["agents"]] == ["support"]
    missing = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "smtpd_agent", "apikey", "create",
                         "--workspace", "nope", "--state-dir", str(tmp_path / "cli")],
        env={"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no workspace" in missing.stderr

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "smtpd_agent", "apikey", *args,
                               "--workspace", "globex", "--state-dir", str(tmp_path / "cli")],
                              env={"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=60, check=False)

    listed = await asyncio.to_thread(cli, "list", "--json")
    [info] = json.loads(listed.stdout)
    assert key.startswith(info["prefix"]) and info["last_used_at"] and key not in listed.stdout
    revoked = await asyncio.to_thread(cli, "revoke", str(info["id"]))
    assert revoked.returncode == 0, revoked.stderr
    async with http.get(f"{server.http_url}/api/v1/workspaces/globex/agents",
                        headers=bearer(key)) as response:
        assert response.status == 401
