"""The new text of a message: its body without the quoted history and the signature.

Place: the standards layer; the inbound content step (pipeline.Pipeline.extract_text) runs it
once per message at store time, and its result is the `extracted_text` column that the API
shows and the agent's prompt uses.

Which lines are quoted history is decided by quotequail (closeio), line by line: reply
intros ("On ... wrote:", in several languages), Outlook's "-----Original Message-----",
its underscore line and bare "From: / Sent: / To: / Subject:" header blocks, forward
markers, and runs of ">" lines. The signature is what follows the RFC 3676 section 4.3
separator line "-- ". HTML-only mail is first reduced to text without the parts clients
mark as quotes (html_text.py).

Bounded, since every byte is the sender's: only the first `max_lines` lines of the first
`max_input` characters are looked at, each line by its first LINE_PROBE characters
(quotequail's patterns are quadratic on one very long line), and at most `max_chars`
characters are kept. When nothing new is left (a bare forward, a reply written only
between the quotes' lines), the whole text is kept instead: never less than the body says.
"""

from __future__ import annotations

from dataclasses import dataclass

import quotequail

from .html_text import html_to_text

# RFC 5322 2.1.1's line limit: longer lines are rare in mail, and a quote intro is short.
LINE_PROBE = 998
# RFC 3676 4.3; some clients or relays drop the trailing space.
SIGNATURE_SEPARATORS = ("-- ", "--")
# Where quotequail's unwrapping can start holds one of these: each of its reply, forward and
# header patterns has a ":", "@" (the dated Gmail intro), a "---" run or the "____" line,
# matched on a line or a line joined with the next, and a quote starts with ">". It tries
# ~40 regular expressions on each line (~50 us) and only looks forward from a line, so the
# lines before the one ahead of the first marker are not handed to it at all
# (tests/unit/test_extract.py holds quotequail's patterns to this).
UNWRAP_MARKERS = (":", ">", "@", "---", "__")


@dataclass(frozen=True)
class ReplyText:
    """A message's new text, and what was taken away to get it."""

    text: str
    quoted: bool  # quoted history found and left out
    signature: bool  # a signature after "-- " left out
    truncated: bool  # longer than max_chars, cut


def new_text(text: str, max_input: int, max_lines: int, max_chars: int) -> ReplyText:
    """The new part of a plain-text body."""
    lines = _lines(text, max_input)
    probe = _probe(lines, max_lines)
    skip = _unwrap_skip(probe)
    found = None if skip is None else quotequail.unwrap("\n".join(probe[skip:]))
    kept, quoted = lines, False
    if found is not None:
        top, bottom = found.get("text_top"), found.get("text_bottom")
        if top:  # quotequail's top, from the line `skip` on; lines before it are top too
            top_end = skip + _leading_blank(probe[skip:]) + top.count("\n") + 1
        else:  # everything from `skip` to the quote is blank
            top_end = skip - _leading_blank(probe[skip - 1::-1]) if skip else 0
        kept = lines[:top_end]
        if bottom:
            start = len(probe) - _leading_blank(probe[::-1]) - bottom.count("\n") - 1
            kept += ([""] if kept else []) + lines[start:]
        quoted = True
    kept, signature = _without_signature(kept)
    result = "\n".join(line.rstrip() for line in kept).strip()
    if not result:
        result, quoted, signature = "\n".join(lines).strip(), False, False
    truncated = len(result) > max_chars or len(text) > max_input
    return ReplyText(result[:max_chars], quoted, signature, truncated)


def message_text(text_body: str | None, html_body: str | None, max_input: int, max_lines: int,
                 max_chars: int, html_max_input: int) -> ReplyText:
    """The new part of a message: of its text part, else of its HTML part as text."""
    if text_body and text_body.strip():
        return new_text(text_body, max_input, max_lines, max_chars)
    if html_body:
        return new_text(html_to_text(html_body[:html_max_input], drop_quotes=True),
                        max_input, max_lines, max_chars)
    return ReplyText("", False, False, False)


def unwrap_lines(text: str, max_input: int, max_lines: int) -> int:
    """How many lines of this plain text quotequail would be given (0: it is not asked):
    the measure of new_text's work, for the caller to choose a thread by."""
    probe = _probe(_lines(text, max_input), max_lines)
    skip = _unwrap_skip(probe)
    return 0 if skip is None else len(probe) - skip


def _lines(text: str, max_input: int) -> list[str]:
    return text[:max_input].replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _probe(lines: list[str], max_lines: int) -> list[str]:
    return [line[:LINE_PROBE] for line in lines[:max_lines]]


def _unwrap_skip(probe: list[str]) -> int | None:
    """How many leading lines cannot start quoted history; None when no line can."""
    for index, line in enumerate(probe):
        if any(marker in line for marker in UNWRAP_MARKERS):
            return max(0, index - 1)  # quotequail joins a line with the next
    return None


def _leading_blank(lines: list[str]) -> int:
    count = 0
    for line in lines:
        if line.strip():
            break
        count += 1
    return count


def _without_signature(lines: list[str]) -> tuple[list[str], bool]:
    """The lines before the first signature separator that follows some text."""
    seen_text = False
    for index, line in enumerate(lines):
        if seen_text and line in SIGNATURE_SEPARATORS:
            return lines[:index], True
        seen_text = seen_text or bool(line.strip())
    return lines, False
