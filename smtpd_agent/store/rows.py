"""The composite row types the store functions take, each from one field list.

A field list here is the only place a type's fields and their order are
written: the migrator creates the SQL type from it (`RowType.ddl`), the
store builds its rows from it (`RowType.row`, by name, so the order cannot
drift), and a test compares it with the database catalog. Every text value
a row carries is cleaned on the way in: Postgres text and jsonb cannot hold
NUL or lone surrogates, and a message must never be refused for a character
in a header (the raw bytes keep the original).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

# SQL types whose values are cleaned of what Postgres refuses.
_TEXT = "text"
_TEXT_ARRAY = "text[]"
_JSONB = "jsonb"


@dataclass(frozen=True)
class RowType:
    """A Postgres composite type: its name and (field, SQL type) in order."""

    name: str
    fields: tuple[tuple[str, str], ...]

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)

    @functools.cached_property
    def _name_set(self) -> frozenset[str]:
        return frozenset(self.names)

    def ddl(self) -> str:
        columns = ",\n    ".join(f'"{name}" {sql}' for name, sql in self.fields)
        return f"CREATE TYPE {self.name} AS (\n    {columns});\n"

    def row(self, **values: Any) -> tuple[Any, ...]:
        """The values as one row of this type, in field order, text cleaned.

        Every field must be given, and nothing else: a renamed or added field
        fails here, at the first message, not as a value in the wrong column.
        """
        if values.keys() != self._name_set:
            missing = [name for name in self.names if name not in values]
            extra = [name for name in values if name not in self._name_set]
            raise TypeError(f"{self.name}: missing {missing}, unknown {extra}")
        return tuple(_clean_value(sql, values[name]) for name, sql in self.fields)


# One message's content: parsed headers and bodies, the raw bytes, the envelope
# and the verdicts. Shared by every mailbox the message is for (sent once per
# message, stored once per workspace) and by the agent's replies.
MESSAGE_CONTENT = RowType("message_content", (
    ("dedup_key", "text"), ("message_id", "text"), ("in_reply_to", "text[]"),
    ("references", "text[]"), ("from_header", "text"), ("from_address", "text"),
    ("to_header", "text"), ("cc_header", "text"), ("reply_to", "text"), ("subject", "text"),
    ("normalized_subject", "text"), ("sent_at", "timestamptz"), ("headers", "jsonb"),
    ("text_body", "text"), ("html_body", "text"), ("raw_sha256", "bytea"), ("raw", "bytea"),
    ("mail_from", "text"), ("client_ip", "inet"), ("helo", "text"), ("tls", "boolean"),
    ("tls_version", "text"), ("session_id", "text"), ("queue_id", "text"),
    ("defects", "text[]"), ("spf", "text"), ("dkim", "text"), ("dmarc", "text"),
    ("arc", "text"), ("auth_results", "text"), ("auth_detail", "jsonb"),
    ("quarantined", "boolean"), ("scan_status", "text"), ("scan_signature", "text"),
    ("spam", "boolean"), ("spam_status", "text"), ("spam_action", "text"),
    ("spam_score", "double precision"), ("spam_required", "double precision"),
    ("spam_symbols", "jsonb"), ("received_at", "timestamptz"),
    ("iprev", "text"), ("extracted_text", "text"),
))

# One attachment of the message_content at `content_position` (1-based).
MESSAGE_ATTACHMENT = RowType("message_attachment", (
    ("content_position", "integer"), ("position", "integer"), ("filename", "text"),
    ("content_type", "text"), ("disposition", "text"), ("content_id", "text"),
    ("sha256", "bytea"), ("content", "bytea"), ("scan_status", "text"),
    ("scan_signature", "text"),
))

# One mailbox a message_content is for, and whether that mailbox answers (agent job).
INBOUND_DELIVERY = RowType("inbound_delivery", (
    ("content_position", "integer"), ("workspace_id", "bigint"), ("agent_id", "bigint"),
    ("auto_reply", "boolean"), ("rcpt_to", "text"),
))

# In the order they are created (a type may use an earlier one).
ROW_TYPES: tuple[RowType, ...] = (MESSAGE_CONTENT, MESSAGE_ATTACHMENT, INBOUND_DELIVERY)


def clean_text(text: str | None) -> str | None:
    """Text as Postgres can store it: NUL removed, lone surrogates replaced."""
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(str(k)): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    return value


def _clean_value(sql: str, value: Any) -> Any:
    if value is None:
        return None
    if sql == _TEXT:
        return clean_text(value)
    if sql == _TEXT_ARRAY:
        return [clean_text(v) for v in value]
    if sql == _JSONB:
        return _clean_json(value)
    return value
