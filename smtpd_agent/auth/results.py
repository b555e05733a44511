"""Authentication-Results (RFC 8601) for the authenticate stage: what we found, in the message.

`header_value()` renders our verdicts under our authserv-id; before the header
is prepended to the stored message, `strip_our_results()` removes any
Authentication-Results field already in the message that claims *our*
authserv-id (RFC 8601 section 5): a sender could otherwise forge "dkim=pass"
in our name. Headers of other servers, and every other byte, stay untouched.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .arc import ArcResult
    from .dkim import DkimResult
    from .dmarc import DmarcResult
    from .spf import SpfResult

HEADER_NAME = b"Authentication-Results"
# RFC 2045 token characters, used by RFC 8601 for values that need no quoting.
TOKEN = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")
# RFC 8601 pvalue: an address ([local-part] "@" domain) or a domain also goes unquoted.
ADDRESS = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]*@?[A-Za-z0-9][A-Za-z0-9\-.]*$")


def _value(text: str) -> str:
    """A property value: bare if it may be, else an RFC 5322 quoted-string."""
    text = text.replace("\r", " ").replace("\n", " ")
    if text and (TOKEN.match(text) or ADDRESS.match(text)):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    text = text.replace("\r", " ").replace("\n", " ")[:200]
    return "(" + re.sub(r"([()\\])", r"\\\1", text) + ")"


def header_value(authserv_id: str, spf: SpfResult, dkim: DkimResult, dmarc: DmarcResult,
                 arc: ArcResult | None = None) -> str:
    """The field body, folded one method per line: "id;\\r\\n\\tspf=pass smtp.mailfrom=..."."""
    parts: list[str] = []

    spf_part = f"spf={spf.result}"
    if spf.reason:
        spf_part += " " + _comment(spf.reason)
    if spf.identity == "mailfrom":
        spf_part += f" smtp.mailfrom={_value(spf.sender)}"
    else:
        spf_part += f" smtp.helo={_value(spf.domain)}"
    parts.append(spf_part)

    if not dkim.signatures:
        parts.append("dkim=none")
    for sig in dkim.signatures:
        dkim_part = f"dkim={sig.result}"
        if sig.reason:
            dkim_part += " " + _comment(sig.reason)
        if sig.domain:
            dkim_part += f" header.d={_value(sig.domain)}"
        if sig.selector:
            dkim_part += f" header.s={_value(sig.selector)}"
        if sig.algorithm:
            dkim_part += f" header.a={_value(sig.algorithm)}"
        if sig.header_b:
            dkim_part += f" header.b={_value(sig.header_b)}"
        parts.append(dkim_part)

    dmarc_part = f"dmarc={dmarc.result}"
    if dmarc.policy:
        dmarc_part += " " + _comment(f"p={dmarc.policy} dis={dmarc.disposition or 'none'}")
    elif dmarc.reason and dmarc.result != "none":
        dmarc_part += " " + _comment(dmarc.reason)
    if dmarc.from_domain:
        dmarc_part += f" header.from={_value(dmarc.from_domain)}"
    parts.append(dmarc_part)

    if arc is not None:
        arc_part = f"arc={arc.result}"
        if arc.reason and arc.result != "pass":
            arc_part += " " + _comment(arc.reason)
        parts.append(arc_part)

    return authserv_id + ";\r\n\t" + ";\r\n\t".join(parts)


def _split_header(raw: bytes) -> tuple[bytes, bytes]:
    """(header section including its last line ending, rest from the blank line on)."""
    match = re.search(rb"\n\r?\n", raw)
    if match is None:
        return raw, b""
    cut = match.start() + 1
    return raw[:cut], raw[cut:]


def _fields(header: bytes) -> list[bytes]:
    """Header fields with their continuation lines and line endings, byte for byte."""
    lines = header.splitlines(keepends=True)
    fields: list[bytes] = []
    for line in lines:
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


# RFC 8601 puts the authserv-id first, after optional CFWS. Real headers open with a
# few bytes of comment at most; a value that is still in comments or whitespace after
# this many characters claims nothing readable and is treated as claiming ours.
MAX_LEADING_CFWS = 4096
MAX_AUTHSERV_ID = 1024  # an RFC 5322 value-or-domain; longer ones are cut, not scanned
OVERLONG = "(overlong)"  # never a real authserv-id: "(" opens a comment


def claimed_authserv_id(field_value: bytes) -> str:
    """The authserv-id an Authentication-Results value starts with (comments skipped).

    One pass over a bounded prefix: nested comments are tracked with a depth counter
    (a regex pass per nesting level took 173 s for 254 KB of parentheses).
    """
    text = field_value[:MAX_LEADING_CFWS + MAX_AUTHSERV_ID].decode("utf-8", "replace")
    end = len(text)
    index = depth = 0
    while index < end:
        if index >= MAX_LEADING_CFWS:
            return OVERLONG
        char = text[index]
        if depth:
            if char == "\\":
                index += 1  # a quoted-pair: the next character is literal
            elif char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
        elif char == "(":
            depth = 1
        elif char not in " \t\r\n":
            break
        index += 1
    if index >= end:
        return ""
    if text[index] == '"':
        closing = text.find('"', index + 1)
        token = text[index + 1:closing if closing != -1 else end]
    else:
        stop = index
        while stop < end and text[stop] not in ' \t\r\n;(':
            stop += 1
        token = text[index:stop]
    return token.lower().rstrip(".")


def strip_our_results(raw: bytes, authserv_id: str) -> bytes:
    """Remove Authentication-Results fields claiming `authserv_id`, or too buried in comments
    to tell (OVERLONG); all other bytes unchanged."""
    ours = authserv_id.lower().rstrip(".")
    header, rest = _split_header(raw)
    kept = []
    for field in _fields(header):
        name, colon, value = field.partition(b":")
        if colon and name.strip().lower() == HEADER_NAME.lower() \
                and claimed_authserv_id(value) in (ours, OVERLONG):
            continue
        kept.append(field)
    return b"".join(kept) + rest


def prepend_results(raw: bytes, authserv_id: str, value: str) -> bytes:
    """Strip forged fields, then put ours first (RFC 8601 section 5: it is a trace field)."""
    stripped = strip_our_results(raw, authserv_id)
    newline = b"\r\n" if b"\r\n" in raw[:4096] or not raw else b"\n"
    body = value.encode("utf-8").replace(b"\r\n", newline)
    return HEADER_NAME + b": " + body + newline + stripped
