"""Parse a received message once, tolerantly.

Mail from the internet is often malformed: broken boundaries, unknown
charsets, RFC 2047 garbage, headers that are not headers. Parsing never
raises; whatever cannot be decoded is kept with replacement characters and
the raw bytes stay untouched for storage.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from email.header import decode_header, make_header

MESSAGE_ID = re.compile(r"<[^<>\s]+>")
SUBJECT_PREFIX = re.compile(r"^\s*((re|fwd?|aw|wg|sv|vs|antw|tr|rif|r)\s*(\[\d+\])?\s*:\s*)+",
                            re.IGNORECASE)
MAX_HEADER_VALUE = 4096


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
    # compat32 never raises on header access; we decode RFC 2047 ourselves.
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    headers = tuple((str(k), _header_text(v)) for k, v in msg.items())
    text_body, html_body, attachments = _walk(msg)
    from_header = _header_text(msg.get("From"))
    from_address = _first_address(msg.get_all("From") or [])
    return ParsedMessage(
        headers=headers,
        message_id=_first_message_id(msg.get("Message-ID")),
        in_reply_to=tuple(MESSAGE_ID.findall(str(msg.get("In-Reply-To") or ""))),
        references=tuple(MESSAGE_ID.findall(" ".join(map(str, msg.get_all("References") or [])))),
        from_header=from_header,
        from_address=from_address,
        to_header=_header_text(msg.get("To")),
        cc_header=_header_text(msg.get("Cc")),
        reply_to=_header_text(msg.get("Reply-To")),
        subject=_header_text(msg.get("Subject")),
        date=_parse_date(msg.get("Date")),
        text_body=text_body,
        html_body=html_body,
        attachments=tuple(attachments),
        defects=tuple(sorted({type(d).__name__ for part in msg.walk() for d in part.defects})),
    )


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
    try:
        date = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if date is None:
        return None
    if date.tzinfo is None:
        date = date.replace(tzinfo=timezone.utc)
    return date


def _decode_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        payload = str(part.get_payload() or "").encode("utf-8", "replace")
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace").replace("\x00", "")
    except LookupError:
        return payload.decode("utf-8", errors="replace").replace("\x00", "")


def _walk(msg: Message) -> tuple[str | None, str | None, list[Attachment]]:
    texts: list[str] = []
    htmls: list[str] = []
    attachments: list[Attachment] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        content_type = part.get_content_type()
        disposition = part.get_content_disposition()
        filename = _header_text(part.get_filename()) if _safe_filename(part) else None
        is_body_text = (content_type in ("text/plain", "text/html")
                        and disposition != "attachment" and filename is None)
        if is_body_text:
            (texts if content_type == "text/plain" else htmls).append(_decode_text(part))
            continue
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
    return ("\n".join(texts) if texts else None,
            "\n".join(htmls) if htmls else None,
            attachments)


def _safe_filename(part: Message) -> bool:
    try:
        return part.get_filename() is not None
    except (ValueError, LookupError, UnicodeError):
        return False
