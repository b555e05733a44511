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


def claimed_authserv_id(field_value: bytes) -> str:
    """The authserv-id an Authentication-Results value starts with (comments skipped)."""
    text = field_value.decode("utf-8", "replace")
    text = re.sub(r"\r?\n[ \t]", " ", text)
    # Drop (possibly nested) comments, RFC 5322 CFWS.
    previous = None
    while previous != text:
        previous = text
        text = re.sub(r"\([^()]*\)", " ", text)
    match = re.match(r"\s*([^\s;]+)", text)
    return match.group(1).strip('"').lower().rstrip(".") if match else ""


def strip_our_results(raw: bytes, authserv_id: str) -> bytes:
    """Remove Authentication-Results fields claiming `authserv_id`; all other bytes unchanged."""
    ours = authserv_id.lower().rstrip(".")
    header, rest = _split_header(raw)
    kept = []
    for field in _fields(header):
        name, colon, value = field.partition(b":")
        if colon and name.strip().lower() == HEADER_NAME.lower() \
                and claimed_authserv_id(value) == ours:
            continue
        kept.append(field)
    return b"".join(kept) + rest


def prepend_results(raw: bytes, authserv_id: str, value: str) -> bytes:
    """Strip forged fields, then put ours first (RFC 8601 section 5: it is a trace field)."""
    stripped = strip_our_results(raw, authserv_id)
    newline = b"\r\n" if b"\r\n" in raw[:4096] or not raw else b"\n"
    body = value.encode("utf-8").replace(b"\r\n", newline)
    return HEADER_NAME + b": " + body + newline + stripped
