"""parse_message gives exactly what it gave before it walked the parts once (issue 20).

reference_parse_message below is smtpd_agent/message.py's parse_message at ea5b4ba, vendored
as the oracle: msg.get / get_all for each field, a walk for the bodies and attachments and a
second walk for the defects. Every field of ParsedMessage must be equal, attachments
byte for byte, on the malformed-MIME fixtures, the benchmark's messages, the clients'
replies, and generated MIME (nested multiparts, every transfer encoding with broken
payloads, unknown and surrogate-making charsets, RFC 2047 and RFC 2231 names, 8-bit headers).
"""

from __future__ import annotations

import base64
import email
import email.policy
import email.utils
from datetime import datetime, timezone
from email.header import decode_header, make_header
from email.message import Message

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smtpd_agent.message import MAX_HEADER_VALUE, MESSAGE_ID, ParsedMessage, parse_message
from tests.integration.test_malformed_mime import (
    BAD_BASE64,
    BAD_CHARSET,
    BROKEN_BOUNDARY,
    NO_HEADERS,
    RFC2047_GARBAGE,
)
from tests.replies import REPLIES
from tests.support import HOSTILE_MIME_LINES

# --- the reference: message.py's parse_message as it was, its helpers renamed ---


def reference_parse_message(raw: bytes) -> tuple:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    headers = tuple((str(k), reference_header_text(v)) for k, v in msg.items())
    text_body, html_body, attachments = reference_walk(msg)
    return (
        headers,
        reference_first_message_id(msg.get("Message-ID")),
        tuple(MESSAGE_ID.findall(str(msg.get("In-Reply-To") or ""))),
        tuple(MESSAGE_ID.findall(" ".join(map(str, msg.get_all("References") or [])))),
        reference_header_text(msg.get("From")),
        reference_first_address(msg.get_all("From") or []),
        reference_header_text(msg.get("To")),
        reference_header_text(msg.get("Cc")),
        reference_header_text(msg.get("Reply-To")),
        reference_header_text(msg.get("Subject")),
        reference_parse_date(msg.get("Date")),
        text_body,
        html_body,
        tuple(attachments),
        tuple(sorted({type(d).__name__ for part in msg.walk() for d in part.defects})),
    )


def reference_header_text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value)
    if "=?" not in text:
        decoded = text
    else:
        try:
            decoded = str(make_header(decode_header(text)))
        except (LookupError, ValueError, UnicodeError, email.errors.HeaderParseError):
            decoded = text
    decoded = decoded.replace("\x00", "")
    return decoded[:MAX_HEADER_VALUE] if len(decoded) > MAX_HEADER_VALUE else decoded


def reference_first_message_id(value: object) -> str | None:
    if value is None:
        return None
    found = MESSAGE_ID.search(str(value))
    return found.group(0)[:998] if found else None


def reference_first_address(values: list[object]) -> str | None:
    try:
        pairs = email.utils.getaddresses([str(v) for v in values])
    except (ValueError, TypeError, IndexError):
        return None
    for _name, address in pairs:
        if "@" in address:
            return address.strip().lower()
    return None


def reference_parse_date(value: object) -> datetime | None:
    if value is None:
        return None
    try:
        date = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if date is None:
        return None
    if date.tzinfo is None:
        date = date.replace(tzinfo=timezone.utc)
    return date


def reference_decode_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        payload = str(part.get_payload() or "").encode("utf-8", "replace")
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace").replace("\x00", "")
    except LookupError:
        return payload.decode("utf-8", errors="replace").replace("\x00", "")


def reference_walk(msg: Message) -> tuple[str | None, str | None, list[tuple]]:
    texts: list[str] = []
    htmls: list[str] = []
    attachments: list[tuple] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        content_type = part.get_content_type()
        disposition = part.get_content_disposition()
        filename = (reference_header_text(part.get_filename())
                    if reference_safe_filename(part) else None)
        is_body_text = (content_type in ("text/plain", "text/html")
                        and disposition != "attachment" and filename is None)
        if is_body_text:
            (texts if content_type == "text/plain" else htmls).append(
                reference_decode_text(part))
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            payload = str(part.get_payload() or "").encode("utf-8", "replace")
        attachments.append((filename, content_type, payload, disposition,
                            reference_header_text(part.get("Content-ID"))))
    return ("\n".join(texts) if texts else None,
            "\n".join(htmls) if htmls else None,
            attachments)


def reference_safe_filename(part: Message) -> bool:
    try:
        return part.get_filename() is not None
    except (ValueError, LookupError, UnicodeError):
        return False


def fields(parsed: ParsedMessage) -> tuple:
    """ParsedMessage as the reference gives it; a date with its offset and tzinfo."""
    return (parsed.headers, parsed.message_id, parsed.in_reply_to, parsed.references,
            parsed.from_header, parsed.from_address, parsed.to_header, parsed.cc_header,
            parsed.reply_to, parsed.subject, parsed.date, parsed.text_body, parsed.html_body,
            tuple((a.filename, a.content_type, a.content, a.disposition, a.content_id)
                  for a in parsed.attachments),
            parsed.defects)


def same(raw: bytes) -> tuple:
    expected = reference_parse_message(raw)
    got = fields(parse_message(raw))
    assert got == expected
    if expected[10] is not None:  # equal instants can differ in offset: compare it too
        assert got[10].utcoffset() == expected[10].utcoffset()
    return expected


# --- inputs ---

def mime(text: str | None = None, html: str | None = None) -> bytes:
    head = (b"From: Alice Smith <alice@example.com>\r\nTo: bob@example.org\r\n"
            b"Subject: Re: plans\r\nDate: Mon, 30 Nov 2026 09:14:00 -0800\r\n"
            b"Message-ID: <m@example.com>\r\nIn-Reply-To: <p@example.org>\r\n"
            b"References: <r@example.org> <p@example.org>\r\nMIME-Version: 1.0\r\n")
    if text and html:
        return (head + b"Content-Type: multipart/alternative; boundary=alt\r\n\r\n--alt\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode()
                + b"\r\n--alt\r\n"
                b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html.encode()
                + b"\r\n--alt--\r\n")
    if html:
        return (head + b"Content-Type: text/html; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                + html.encode().replace(b"=", b"=3D") + b"\r\n")
    return (head + b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
            + (text or "").replace("\n", "\r\n").encode())


def test_the_same_on_the_malformed_fixtures_and_the_replies():
    for raw in (BROKEN_BOUNDARY, BAD_CHARSET, RFC2047_GARBAGE, NO_HEADERS, BAD_BASE64):
        same(raw)
    for reply in REPLIES:
        same(mime(reply.text, reply.html))
        if reply.text:
            same(mime(reply.text, f"<p>{reply.text}</p>"))


def test_the_same_on_the_benchmarks_messages():
    from bench.parse_extract import messages

    for name, raw in messages(2).items():
        expected = same(raw)
        assert expected[11] or expected[12], name  # each has a body the test compared
        if "attachment" in name:
            assert expected[13] and expected[13][0][0] == "doc.pdf"


def test_decoding_defects_are_still_counted():
    """Decoding a bad base64 payload adds a defect to its part: it is counted once the
    part is decoded, as the second walk did."""
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"QUJDRA\r\n--b--\r\n")
    expected = same(raw)
    assert "InvalidBase64PaddingDefect" in expected[14]
    assert parse_message(raw).attachments[0].content == b"ABCD"


def test_the_same_where_the_header_section_ends_oddly():
    """A single-part message's header section is parsed alone up to the first CRLF CRLF
    (message._message_from_bytes); these are the cases where that must not change what
    the whole parse gives."""
    for raw in (b"Subject: x\r\n\r\nbody\r\n", b"Subject: x\r\n\r\n", b"Subject: x\r\n\r\n\r\n",
                b"\r\nSubject: x\r\n\r\nbody", b"Subject: x\n\nbody\r\n\r\nmore",
                b"Subject: x\r\nno header here\r\n\r\nbody", b"Subject: x\r\n\tfolded\r\n\r\nb",
                b"From nobody Mon Nov 30 2026\r\nSubject: x\r\n\r\nb", b"Subject: x\r\r\n\r\nb",
                b"Subject: x\r\n\r\nbody\rwith bare CR\nand LF\r\n\r\n", b"Subject: x",
                b"Content-Type: Multipart/Mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
                b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nbody",
                b"Content-Type: multipart\r\n /mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--",
                b"Subject: message/rfc822 talk\r\n\r\nbody", b"Subject: \xff\xfe\r\n\r\n\xff body",
                b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nQUJDRA"):
        same(raw)


HEADERS = st.sampled_from([
    b"From: Alice <alice@example.com>\r\n", b"From: bob@example.org\r\n", b"From: \r\n",
    b"From: =?utf-8?q?Ren=C3=A9e?= <Renee@Example.ORG>\r\n", b"From: <>\r\n",
    b"From: a@b, c@d\r\n", b"From: \"Q, x\" <q@x.test>\r\n", b"From: J\xc3\xb6rg <j@x>\r\n",
    b"From: undisclosed-recipients:;\r\n", b"From: (comment) a@b (c)\r\n",
    b"To: x@y\r\n", b"Cc: c@d\r\n", b"Reply-To: r@s\r\n", b"Subject: =?utf-8?B?w6l0w6k=?=\r\n",
    b"Subject: plain\r\n", b"Subject: =?bogus?X?zzz?=\r\n", b"Subject: \xff\xfe\r\n",
    b"Date: Tue, 3 Nov 2026 10:00:00 +0100\r\n", b"Date: 3 Nov 26 10:00 -0000\r\n",
    b"Date: garbage\r\n", b"Date: Tue, 31 Feb 2026 10:00:00 +0000\r\n",
    b"Date: Tue, 3 Nov 2026 10:00:00 +2400\r\n", b"Message-ID: <a@b>\r\n",
    b"Message-ID: none\r\n", b"In-Reply-To: <p@x> (c)\r\n", b"References: <r1@x>\r\n <r2@x>\r\n",
    b"References: <r3@x>\r\n", b"X-Folded: a\r\n\tb\r\n", b"Content-ID: <cid@x>\r\n",
    b"X-Nul: a\x00b\r\n", b"not a header line\r\n",
])
CONTENT = st.sampled_from([
    b"text/plain", b"text/plain; charset=utf-8", b"text/plain; charset=iso-8859-1",
    b"text/plain; charset=x-nope", b"text/plain; charset=utf-7", b"text/html",
    b"text/html; charset=utf-16", b"text/plain; name=notes.txt", b"application/pdf",
    b"image/png; name=\"=?utf-8?q?bild=C3=A9.png?=\"", b"application/octet-stream",
    b"message/delivery-status",
])
DISPOSITION = st.sampled_from([
    b"", b"Content-Disposition: inline\r\n", b"Content-Disposition: attachment\r\n",
    b"Content-Disposition: attachment; filename=a.txt\r\n",
    b"Content-Disposition: attachment; filename*=utf-8''%C3%A9t%C3%A9.txt\r\n",
    b"Content-Disposition: attachment; filename*=x-nope''%ff\r\n",
    b"Content-Disposition: attachment; filename*=utf-8''%ff%fe\r\n",
    b"Content-Disposition: inline; filename*0=a; filename*1=b.txt\r\n",
])
ENCODING = st.sampled_from([b"", b"7bit", b"8bit", b"base64", b"quoted-printable",
                            b"x-uuencode", b"binary", b"bogus"])
PAYLOAD = st.one_of(
    st.sampled_from([b"hello\r\nworld\r\n", b"caf=E9 =ZZ broken=\r\n", b"QUJDRA\r\n",
                     b"!!!not base64===\r\n", b"\xff\xfe raw 8bit \x00 nul\r\n",
                     b"+2D0- utf-7 surrogate\r\n", b"begin 644 x\r\n#86)C\r\n`\r\nend\r\n",
                     b"Reporting-MTA: dns; a\r\n\r\nFinal-Recipient: rfc822; b@c\r\n", b""]),
    st.binary(max_size=80),
    st.builds(lambda b: base64.encodebytes(b).replace(b"\n", b"\r\n"), st.binary(max_size=90)),
)


@st.composite
def parts(draw: st.DrawFn, depth: int = 0) -> bytes:
    headers = b"".join(draw(st.lists(HEADERS, max_size=2))) if depth else b""
    if depth < 2 and draw(st.integers(0, 3)) == 0:
        boundary = draw(st.sampled_from([b"b1", b"b2", b"x"]))
        children = draw(st.lists(parts(depth + 1), max_size=3))
        kind = draw(st.sampled_from([b"mixed", b"alternative", b"related"]))
        body = b"".join(b"--" + boundary + b"\r\n" + child + b"\r\n" for child in children)
        close = draw(st.sampled_from([b"--" + boundary + b"--\r\n", b"", b"--wrong--\r\n"]))
        return (headers + b"Content-Type: multipart/" + kind + b"; boundary=" + boundary
                + b"\r\n\r\n" + draw(st.sampled_from([b"", b"preamble\r\n"])) + body + close)
    if depth < 2 and draw(st.integers(0, 6)) == 0:
        return headers + b"Content-Type: message/rfc822\r\n\r\n" + draw(parts(depth + 1))
    encoding = draw(ENCODING)
    return (headers + b"Content-Type: " + draw(CONTENT) + b"\r\n" + draw(DISPOSITION)
            + (b"Content-Transfer-Encoding: " + encoding + b"\r\n" if encoding else b"")
            + b"\r\n" + draw(PAYLOAD))


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    return b"".join(draw(st.lists(HEADERS, max_size=8))) + draw(parts())


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
@example(b"From: a@b\r\nFrom: c@d\r\nReferences: <1@x>\r\nReferences: <2@x>\r\n\r\nbody")
def test_the_same_on_generated_mime(raw):
    same(raw)


PIECES = st.sampled_from(HOSTILE_MIME_LINES)


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES | st.binary(max_size=60), max_size=40))
def test_the_same_on_hostile_pieces(pieces):
    same(b"".join(pieces))


# --- the From address and the Date, which have a shortcut for their common shapes ---

FROM_PIECES = st.sampled_from([
    "Alice", "Smith", "J.", "=?utf-8?q?Ren=C3=A9e?=", "Jörg", "\"Smith, John\"", "\"a\\\"b\"",
    "\"\"", "\"open", " ", "  ", "\t", "\r\n ", "<", ">", "@", ".", ",", ":", ";", "(c)",
    "(", ")", "[", "]", "\\", "alice@example.com", "Bob@Example.ORG", "a.b+tag@x-y.test",
    "first.last", "example.com", "x", "-", "_", "'", "a..b", "@route:", "\xa0", "\x0b", "日本",
    "<alice@example.com>", "<a@b@c>", "<a@[1.2.3.4]>", "<>", "a@b.", ".a@b",
])
WORDS = st.sampled_from([
    "Alice", "J.", "=?utf-8?q?Ren=C3=A9e?=", "Jörg", "\"Smith, John\"", "\"a@b <c@d>\"",
    "\"a\\\"b\"", "bob@example.org", "a,", "a;", "a:", "(c)", "x(y)", "[z]", "\\", "a.b",
    "\xa0", "a\x0bb", "日本", "'q'", "-", "",
])
ADDRESSES = st.sampled_from([
    "alice@example.com", "Bob@Example.ORG", "a.b+tag@x-y.test", "a..b@c", ".a@b", "a@b.",
    "a@b@c", "a@[1.2.3.4]", "@r:a@b", "\"q\"@x.test", "a b@c", "", "a", "a@-b.c",
])


@st.composite
def from_values(draw: st.DrawFn) -> str:
    """`words <address>`, `address` and the like, with tricky words and addresses."""
    space = st.sampled_from([" ", "", "  ", "\t", "\r\n "])
    words = "".join(w + draw(space) for w in draw(st.lists(WORDS, max_size=4)))
    address = draw(ADDRESSES)
    shape = draw(st.sampled_from(["{w}<{a}>", "{a}", "{w}{a}", "{w}<{a}>{s}", "{s}{a}{s}",
                                  "{w}<{a}> <c@d>", "{w}<{a}>, c@d", "{w}<{a}"]))
    return shape.format(w=words, a=address, s=draw(space))


DATE_PIECES = st.sampled_from([
    "Sat, ", "Mon,", "Foo, ", "sat, ", "1", "01", "21", "0", "31", "32", "99", " ", "  ",
    "Nov", "nov", "November", "Feb", "Xyz", "2026", "26", "0099", "0999", "1969", "9999",
    "05:00:00", "05:00", "5:00:00", "24:00:00", "23:59:60", "05.00.00", "+0000", "-0000",
    "+0100", "-0800", "+0530", "+0099", "+2359", "+2400", "-9999", "UTC", "GMT", "EST", "Z",
    "(UTC)", "(Pacific Standard Time)", "(", ",", "\t",
])


@st.composite
def common_dates(draw: st.DrawFn) -> str:
    """Dates near the common shape, each field sometimes out of its range."""
    weekday = draw(st.sampled_from(["", "Sat, ", "Tue, "]))
    day = draw(st.sampled_from(["1", "09", "21", "29", "30", "31", "0", "00", "99"]))
    month = draw(st.sampled_from(["Jan", "Feb", "Apr", "Nov", "Dec"]))
    year = draw(st.sampled_from(["2026", "2024", "2100", "1900", "1000", "9999"]))
    hour, minute, second = (draw(st.sampled_from(["00", "05", "23", "24", "59", "60", "99"]))
                            for _ in range(3))
    zone = draw(st.sampled_from(["+0000", "-0000", "+0100", "-0800", "+0530", "-0130",
                                 "+0099", "+2359", "+2400", "-2400", "+9999"]))
    comment = draw(st.sampled_from(["", " (UTC)", " (Pacific Standard Time)", " (x)y"]))
    return f"{weekday}{day} {month} {year} {hour}:{minute}:{second} {zone}{comment}"


def same_date(value: str) -> None:
    from smtpd_agent.message import _parse_date

    got, expected = _parse_date(value), reference_parse_date(value)
    assert got == expected
    if expected is not None:
        assert (got.utcoffset(), got.tzinfo) == (expected.utcoffset(), expected.tzinfo)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(from_values(), st.lists(FROM_PIECES, max_size=8).map("".join)))
@example("Load <load@sender.bench.test>")
@example("a@b, c@d")
@example("<a@b>x")
@example("Name <a@b> <c@d>")
@example("bob@example.org <alice@example.com>")
def test_the_from_address_is_what_getaddresses_gives(value):
    from smtpd_agent.message import _first_address

    assert _first_address([value]) == reference_first_address([value])
    assert _first_address([value, "c@d"]) == reference_first_address([value, "c@d"])


@settings(max_examples=1000, deadline=None)
@given(st.one_of(common_dates(), st.lists(DATE_PIECES, max_size=8).map("".join)))
@example("Sat, 21 Nov 2026 05:00:00 +0000")
@example("Sat, 21 Nov 2026 05:00:00 -0000")
@example("21 Nov 2026 05:00:00 +0000 (UTC)")
def test_the_date_is_what_parsedate_to_datetime_gives(value):
    same_date(value)
