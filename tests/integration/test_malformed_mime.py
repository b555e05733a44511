"""Malformed MIME is stored, raw bytes intact, with whatever could be decoded."""

from __future__ import annotations

import pytest

from tests.integration.test_protocol import start_transaction

BROKEN_BOUNDARY = (b"Subject: broken boundary\r\nMessage-ID: <bb@example.org>\r\n"
                   b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"abc\"\r\n\r\n"
                   b"--abc\r\nContent-Type: text/plain\r\n\r\nfirst part\r\n"
                   b"--abd\r\nContent-Type: application/pdf; name=x.pdf\r\n\r\nnot closed\r\n")
BAD_CHARSET = (b"Subject: =?x-unknown-charset?Q?caf=E9?=\r\nMessage-ID: <cs@example.org>\r\n"
               b"Content-Type: text/plain; charset=\"x-no-such-charset\"\r\n"
               b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9 =ZZ broken\r\n")
RFC2047_GARBAGE = (b"Subject: =?utf-8?B?!!!not-base64===?= and =?utf-8?Q?ok?=\r\n"
                   b"From: =?iso-8859-1?q?J=F6rg?= <=?utf-8?b?@@@?=>\r\n"
                   b"Message-ID: <garbage@example.org>\r\n\r\n\xff\xfe raw 8bit \x00 nul\r\n")
NO_HEADERS = b"just a body line without any header\r\n"
BAD_BASE64 = (b"Subject: bad base64\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
              b"Content-Type: image/png; name=\"a.png\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
              b"iVBORw0KGgo!!!@@@\r\n--b--\r\n")


@pytest.mark.parametrize("raw", [BROKEN_BOUNDARY, BAD_CHARSET, RFC2047_GARBAGE, NO_HEADERS,
                                 BAD_BASE64],
                         ids=["broken-boundary", "bad-charset", "rfc2047-garbage", "no-headers",
                              "bad-base64"])
async def test_malformed_message_is_stored_with_raw_bytes_intact(server, db, raw):
    dialogue = start_transaction(server.port)
    assert dialogue.command("DATA")[0] == 354
    dialogue.send(raw + b".\r\n")
    code, lines = dialogue.reply()
    assert code == 250, lines
    row = await db.fetchrow("SELECT messages.raw, subject, text_body, defects FROM messages")
    assert row["raw"].endswith(b"\r\n" + raw)
    assert row["raw"].startswith(b"Authentication-Results: ")


async def test_undecodable_parts_are_kept_readable(server, db):
    dialogue = start_transaction(server.port)
    dialogue.command("DATA")
    dialogue.send(BAD_CHARSET + b".\r\n")
    assert dialogue.reply()[0] == 250
    row = await db.fetchrow("SELECT subject, text_body FROM messages")
    assert "caf" in row["subject"]
    assert row["text_body"].startswith("caf")
