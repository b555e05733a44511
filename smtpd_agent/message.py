"""Parse a received message once, tolerantly.

Mail from the internet is often malformed: broken boundaries, unknown
charsets, RFC 2047 garbage, headers that are not headers. Parsing never
raises; whatever cannot be decoded is kept with replacement characters and
the raw bytes stay untouched for storage.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import email.utils
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.message import Message
from email.header import decode_header, make_header

MESSAGE_ID = re.compile(r"<[^<>\s]+>")
SUBJECT_PREFIX = re.compile(r"^\s*((re|fwd?|aw|wg|sv|vs|antw|tr|rif|r)\s*(\[\d+\])?\s*:\s*)+",
                            re.IGNORECASE)
MAX_HEADER_VALUE = 4096
# The common shapes of a From value, `Name <addr>` and a bare `addr`, with nothing in them that
# email.utils.getaddresses treats specially (comments, groups, routes, escapes, folding): for
# these it returns the addr-spec as written, so it is taken without its char-by-char parse.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR_SPEC = rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_WORD = r'(?:[^()<>@,:;"\[\]\\\s]+|"[^"\\\r\n]*")'
SIMPLE_FROM = re.compile(rf"[ \t]*(?:(?:{_WORD}[ \t]+)*(?:{_WORD}[ \t]*)?<({_ADDR_SPEC})>"
                         rf"|({_ADDR_SPEC}))[ \t]*")
SIMPLE_FROM_MAX = 998  # RFC 5322 2.1.1's line: longer values are not common, and get the slow way
# RFC 5322 3.3's date as mail clients write it, optionally with a trailing zone comment:
# email.utils.parsedate_to_datetime reads it as these fields say (its two-digit years and
# obsolete zones do not match).
MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
COMMON_DATE = re.compile(r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?([0-9]{1,2}) "
                         r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) ([1-9][0-9]{3}) "
                         r"([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"
                         r"(?: \([A-Za-z0-9 +:-]*\))?")
# Content types the feed parser looks into; a header section that may name one is parsed
# with its body (_message_from_bytes).
NESTING = ("multipart", "message")
_MAY_NEST = re.compile("multipart/|message/", re.IGNORECASE)
# The headers ParsedMessage has a field for, by their lowercased names.
FIELD_HEADERS = frozenset({"message-id", "in-reply-to", "references", "from", "to", "cc",
                           "reply-to", "subject", "date"})


@dataclass(frozen=True)
class Attachment:
    filename: str | None
    content_type: str
    content: bytes
    disposition: str | None = None
    content_id: str | None = None

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.content).digest()

    @property
    def size(self) -> int:
        return len(self.content)


@dataclass(frozen=True)
class ParsedMessage:
    headers: tuple[tuple[str, str], ...]
    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    from_header: str | None
    from_address: str | None
    to_header: str | None
    cc_header: str | None
    reply_to: str | None
    subject: str | None
    date: datetime | None
    text_body: str | None
    html_body: str | None
    attachments: tuple[Attachment, ...] = field(default=())
    defects: tuple[str, ...] = field(default=())

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    @property
    def normalized_subject(self) -> str:
        return normalize_subject(self.subject)


def normalize_subject(subject: str | None) -> str:
    """Strip reply/forward prefixes (in several languages) and fold whitespace."""
    if not subject:
        return ""
    stripped = SUBJECT_PREFIX.sub("", subject)
    return " ".join(stripped.split()).casefold()


def parse_message(raw: bytes) -> ParsedMessage:
    msg = _message_from_bytes(raw)
    items = msg.items()
    headers = tuple((str(k), _header_text(v)) for k, v in items)
    # One pass over the headers for every field; msg.get scans all of them for each.
    fields: dict[str, list[object]] = {}
    for name, value in items:
        lowered = name.lower()
        if lowered in FIELD_HEADERS:
            fields.setdefault(lowered, []).append(value)

    def first(name: str) -> object:
        values = fields.get(name)
        return values[0] if values else None

    text_body, html_body, attachments, defects = _walk(msg)
    return ParsedMessage(
        headers=headers,
        message_id=_first_message_id(first("message-id")),
        in_reply_to=tuple(MESSAGE_ID.findall(str(first("in-reply-to") or ""))),
        references=tuple(MESSAGE_ID.findall(" ".join(map(str, fields.get("references", []))))),
        from_header=_header_text(first("from")),
        from_address=_first_address(fields.get("from", [])),
        to_header=_header_text(first("to")),
        cc_header=_header_text(first("cc")),
        reply_to=_header_text(first("reply-to")),
        subject=_header_text(first("subject")),
        date=_parse_date(first("date")),
        text_body=text_body,
        html_body=html_body,
        attachments=tuple(attachments),
        defects=tuple(sorted(defects)),
    )


def _message_from_bytes(raw: bytes) -> Message:
    """email.message_from_bytes(raw, policy=compat32), the body of a single-part message
    not split into lines: the feed parser reads a body line by line only to join the lines
    back into the payload, which cost as much as parsing the headers.

    Such a message's header section is parsed alone (headers-only), up to the first empty
    line; when that parse ends exactly there (no body line left over: the same lines
    ended the headers as in a full parse) and the type is neither multipart nor message,
    the rest of the text is the payload, as the full parse would set it. Anything else is
    parsed whole. compat32 never raises on header access; RFC 2047 is decoded by us.
    """
    text = raw.decode("ascii", "surrogateescape")
    end = text.find("\r\n\r\n") + 4
    if end >= 4 and not _MAY_NEST.search(text, 0, end):
        msg = email.parser.Parser(policy=email.policy.compat32).parsestr(text[:end],
                                                                         headersonly=True)
        if msg.get_payload() == "" and msg.get_content_maintype() not in NESTING:
            msg.set_payload(text[end:])
            return msg
    return email.parser.Parser(policy=email.policy.compat32).parsestr(text)


def _header_text(value: object) -> str | None:
    """Decode RFC 2047 words; on garbage, fall back to the undecoded text."""
    if value is None:
        return None
    text = str(value)
    if "=?" not in text:  # no encoded words: decoding would give the text back, slowly
        decoded = text
    else:
        decoded = _decode_words(text)
    decoded = decoded.replace("\x00", "")
    return decoded[:MAX_HEADER_VALUE] if len(decoded) > MAX_HEADER_VALUE else decoded


def _decode_words(text: str) -> str:
    try:
        return str(make_header(decode_header(text)))
    except (LookupError, ValueError, UnicodeError, email.errors.HeaderParseError):
        return text


def _first_message_id(value: object) -> str | None:
    if value is None:
        return None
    found = MESSAGE_ID.search(str(value))
    return found.group(0)[:998] if found else None


def _first_address(values: list[object]) -> str | None:
    text = str(values[0]) if len(values) == 1 else ""
    if len(text) <= SIMPLE_FROM_MAX and (simple := SIMPLE_FROM.fullmatch(text)):
        return (simple.group(1) or simple.group(2)).lower()
    try:
        pairs = email.utils.getaddresses([str(v) for v in values])
    except (ValueError, TypeError, IndexError):
        return None
    for _name, address in pairs:
        if "@" in address:
            return address.strip().lower()
    return None


def _parse_date(value: object) -> datetime | None:
    if value is None:
        return None
    text = str(value)
    try:
        common = COMMON_DATE.fullmatch(text)
        date = _common_date(common) if common else email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if date is None:
        return None
    if date.tzinfo is None:
        date = date.replace(tzinfo=timezone.utc)
    return date


def _common_date(found: re.Match[str]) -> datetime:
    """What parsedate_to_datetime gives for a COMMON_DATE, with _parse_date's UTC for
    "-0000" (no zone known); minutes above 59 count as it counts them; ValueError where it
    raises (no such day, hour 24, an offset of a day or more)."""
    day, month, year, hour, minute, second, sign, zone_hours, zone_minutes = found.groups()
    fields = (int(year), MONTHS[month], int(day), int(hour), int(minute), int(second))
    offset = int(zone_hours) * 3600 + int(zone_minutes) * 60
    return datetime(*fields, tzinfo=timezone(timedelta(seconds=-offset if sign == "-" else offset)))


def _decode_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        payload = str(part.get_payload() or "").encode("utf-8", "replace")
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace").replace("\x00", "")
    except LookupError:
        return payload.decode("utf-8", errors="replace").replace("\x00", "")


def _walk(msg: Message) -> tuple[str | None, str | None, list[Attachment], set[str]]:
    """Bodies, attachments and the defects of every part, in one walk. A part's defects are
    taken after its payload is decoded: decoding adds some (bad base64 padding)."""
    texts: list[str] = []
    htmls: list[str] = []
    attachments: list[Attachment] = []
    defects: set[str] = set()
    for part in msg.walk():
        if not part.is_multipart():
            _take(part, texts, htmls, attachments)
        if part.defects:
            defects.update(type(d).__name__ for d in part.defects)
    return ("\n".join(texts) if texts else None,
            "\n".join(htmls) if htmls else None,
            attachments, defects)


def _take(part: Message, texts: list[str], htmls: list[str],
          attachments: list[Attachment]) -> None:
    content_type = part.get_content_type()
    disposition = part.get_content_disposition()
    try:
        name = part.get_filename()
    except (ValueError, LookupError, UnicodeError):
        name = None
    filename = _header_text(name)
    if (content_type in ("text/plain", "text/html") and disposition != "attachment"
            and filename is None):
        (texts if content_type == "text/plain" else htmls).append(_decode_text(part))
        return
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        payload = str(part.get_payload() or "").encode("utf-8", "replace")
    attachments.append(Attachment(
        filename=filename,
        content_type=content_type,
        content=payload,
        disposition=disposition,
        content_id=_header_text(part.get("Content-ID")),
    ))
