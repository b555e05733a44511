"""Parsing received bytes: tolerant, never raising, decoding what can be decoded."""

from __future__ import annotations

from email.header import decode_header, make_header

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpd_agent.message import MAX_HEADER_VALUE, _header_text, normalize_subject, parse_message


def test_headers_bodies_and_references():
    raw = (b"From: =?utf-8?q?Ren=C3=A9e?= <Renee@Example.ORG>\r\nTo: a@b.c\r\n"
           b"Subject: =?utf-8?b?w6l0w6k=?=\r\nMessage-ID: <m1@example.org>\r\n"
           b"In-Reply-To: <p1@x> (comment)\r\nReferences: <r1@x>\r\n <p1@x>\r\n"
           b"Date: Tue, 3 Nov 2026 10:00:00 +0100\r\n\r\nhi\r\n")
    parsed = parse_message(raw)
    assert parsed.from_header == "Renée <Renee@Example.ORG>"
    assert parsed.from_address == "renee@example.org"
    assert parsed.subject == "été"
    assert parsed.message_id == "<m1@example.org>"
    assert parsed.in_reply_to == ("<p1@x>",)
    assert parsed.references == ("<r1@x>", "<p1@x>")
    assert parsed.date.isoformat() == "2026-11-03T10:00:00+01:00"
    assert parsed.text_body == "hi\r\n" or parsed.text_body == "hi\n"


def test_inline_text_with_a_filename_is_an_attachment():
    raw = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
           b"Content-Type: text/plain\r\n\r\nbody\r\n--x\r\n"
           b"Content-Type: text/plain; name=notes.txt\r\n\r\nnotes\r\n--x--\r\n")
    parsed = parse_message(raw)
    assert parsed.text_body.strip() == "body"
    assert [(a.filename, a.content) for a in parsed.attachments] == [("notes.txt", b"notes")]


def test_garbage_never_raises():
    for raw in (b"", b"\x00\xff" * 100, b"Content-Type: multipart/mixed\r\n\r\n--\r\n",
                b":::\r\n\r\n", b"Subject: =?bogus?X?zzz?=\r\n\r\n"):
        parse_message(raw)


def test_subject_normalization():
    assert normalize_subject("Re: RE: Fwd:  Invoice   42") == "invoice 42"
    assert normalize_subject("AW: SV: Antw: Tr: hello") == "hello"
    assert normalize_subject("Re[2]: hello") == "hello"
    assert normalize_subject("Regarding the report") == "regarding the report"
    assert normalize_subject(None) == ""


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_header_text_without_encoded_words_is_what_full_decoding_gives(text):
    if "=?" in text:
        return
    expected = str(make_header(decode_header(text))).replace("\x00", "")
    assert _header_text(text) == expected[:MAX_HEADER_VALUE]
