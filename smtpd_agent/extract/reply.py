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

import re
from dataclasses import dataclass

import quotequail

from .html_text import html_to_text

# RFC 5322 2.1.1's line limit: longer lines are rare in mail, and a quote intro is short.
LINE_PROBE = 998
# RFC 3676 4.3; some clients or relays drop the trailing space.
SIGNATURE_SEPARATORS = ("-- ", "--")
# A line that is one of SIGNATURE_SEPARATORS, with the line break before it: the regular
# expression's literal prefix makes the search one pass in C, where a loop over the lines
# that begin with "--" took 0.3 us each.
SIGNATURE_LINE = re.compile(r"\n-- ?(?=\n|\Z)")
# Where quotequail's unwrapping can start holds one of these: each of its reply, forward and
# header patterns has a ":", "@" (the dated Gmail intro), a "---" run or the "____" line,
# matched on a line or a line joined with the next, and a quote starts with ">". It tries
# ~40 regular expressions on each line (~50 us) and only looks forward from a line, so the
# lines before the one ahead of the first marker are not handed to it at all
# (tests/unit/test_extract.py holds quotequail's patterns to this).
UNWRAP_MARKERS = (":", ">", "@", "---", "__")
# What str.splitlines() breaks at besides "\r" and "\n"; without them it splits as new_text
# does (at "\r\n", "\r" and "\n"), in one call.
OTHER_LINE_BREAKS = ("\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


@dataclass(frozen=True)
class ReplyText:
    """A message's new text, and what was taken away to get it."""

    text: str
    quoted: bool  # quoted history found and left out
    signature: bool  # a signature after "-- " left out
    truncated: bool  # longer than max_chars, cut


def new_text(text: str, max_input: int, max_lines: int, max_chars: int) -> ReplyText:
    """The new part of a plain-text body."""
    return Body(text, max_input, max_lines).new_text(max_chars)


class Body:
    """A plain-text body as new_text looks at it: the lines of its first `max_input`
    characters, and the line quotequail's unwrapping would start at. Built once, for the
    pipeline both to measure the work (unwrap_lines) and to do it (new_text).

    Markers and the signature separator are found with str.find over the text joined
    again: a Python loop over the lines cost more than the rest of the extraction of a
    body without quoted history, the common case.
    """

    __slots__ = ("text", "lines", "normal", "max_input", "max_lines", "skip")

    def __init__(self, text: str, max_input: int, max_lines: int) -> None:
        self.text = text
        self.lines = _lines(text, max_input)
        self.normal = "\n".join(self.lines)
        self.max_input = max_input
        self.max_lines = max_lines
        self.skip = _unwrap_skip(self.normal, max_lines)

    @property
    def unwrap_lines(self) -> int:
        """How many lines quotequail is given (0: it is not asked)."""
        return 0 if self.skip is None else min(len(self.lines), self.max_lines) - self.skip

    def new_text(self, max_chars: int) -> ReplyText:
        """The new part of this body."""
        lines, skip = self.lines, self.skip
        kept, kept_text, quoted = lines, self.normal, False
        if skip is not None:
            probe = _probe(lines, self.max_lines)
            found = quotequail.unwrap("\n".join(probe[skip:]))
            if found is not None:
                kept = _unquoted(lines, probe, skip, found)
                kept_text, quoted = "\n".join(kept), True
        end = _signature_line(kept_text)
        signature = end is not None
        if signature:
            kept = kept[:end]
        result = "\n".join(map(str.rstrip, kept)).strip()
        if not result:
            result, quoted, signature = self.normal.strip(), False, False
        truncated = len(result) > max_chars or len(self.text) > self.max_input
        return ReplyText(result[:max_chars], quoted, signature, truncated)


def _unquoted(lines: list[str], probe: list[str], skip: int,
              found: dict[str, str]) -> list[str]:
    """The lines around the quoted history quotequail found in probe[skip:]."""
    top, bottom = found.get("text_top"), found.get("text_bottom")
    if top:  # quotequail's top, from the line `skip` on; lines before it are top too
        top_end = skip + _leading_blank(probe[skip:]) + top.count("\n") + 1
    else:  # everything from `skip` to the quote is blank
        top_end = skip - _leading_blank(probe[skip - 1::-1]) if skip else 0
    kept = lines[:top_end]
    if bottom:
        start = len(probe) - _leading_blank(probe[::-1]) - bottom.count("\n") - 1
        kept += ([""] if kept else []) + lines[start:]
    return kept


def message_text(text_body: str | None, html_body: str | None, max_input: int, max_lines: int,
                 max_chars: int, html_max_input: int) -> ReplyText:
    """The new part of a message: of its text part, else of its HTML part as text."""
    if text_body and not text_body.isspace():  # as strip() would say, without a copy
        return new_text(text_body, max_input, max_lines, max_chars)
    if html_body:
        return new_text(html_to_text(html_body[:html_max_input], drop_quotes=True),
                        max_input, max_lines, max_chars)
    return ReplyText("", False, False, False)


def unwrap_lines(text: str, max_input: int, max_lines: int) -> int:
    """How many lines of this plain text quotequail would be given (0: it is not asked):
    the measure of new_text's work, for the caller to choose a thread by."""
    return Body(text, max_input, max_lines).unwrap_lines


def _lines(text: str, max_input: int) -> list[str]:
    text = text[:max_input]
    if any(other in text for other in OTHER_LINE_BREAKS):
        return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = text.splitlines()
    if not text or text[-1] in "\r\n":  # split() gives the empty line after the last break
        lines.append("")
    return lines


def _probe(lines: list[str], max_lines: int) -> list[str]:
    window = lines[:max_lines]
    if max(map(len, window), default=0) <= LINE_PROBE:  # nothing to cut, the common case
        return window
    return [line[:LINE_PROBE] for line in window]


def _unwrap_skip(normal: str, max_lines: int) -> int | None:
    """How many leading lines cannot start quoted history; None when no line can.

    As if each of the first `max_lines` lines were looked at by its first LINE_PROBE
    characters, but with str.find over the whole text: a Python loop over the lines
    cost more than the rest of the extraction of a marker-free body.
    """
    at, size = 0, len(normal)
    while (found := _first_marker(normal, at, size)) >= 0:
        start = max(normal.rfind("\n", at, found) + 1, at)
        end = normal.find("\n", found)
        end = size if end < 0 else end
        if _first_marker(normal, start, min(start + LINE_PROBE, end)) >= 0:
            index = normal.count("\n", 0, start)
            # quotequail joins a line with the next
            return max(0, index - 1) if index < max_lines else None
        at = end + 1
    return None


def _first_marker(text: str, start: int, end: int) -> int:
    """Where the first of UNWRAP_MARKERS wholly in text[start:end] begins; -1: none."""
    best = -1
    for marker in UNWRAP_MARKERS:
        limit = end if best < 0 else best + len(marker) - 1  # only one starting before best
        # a single character is found by memchr; a longer marker only where its first is
        if len(marker) > 1 and text.find(marker[0], start, limit) < 0:
            continue
        found = text.find(marker, start, limit)
        if found >= 0:
            best = found
    return best


def _leading_blank(lines: list[str]) -> int:
    count = 0
    for line in lines:
        if line.strip():
            break
        count += 1
    return count


def _signature_line(text: str) -> int | None:
    """Which line of `text` is the first signature separator that follows a line with
    text; None if none is."""
    at = text.find("\n", len(text) - len(text.lstrip()))
    found = None if at < 0 else SIGNATURE_LINE.search(text, at)
    return None if found is None else text.count("\n", 0, found.start() + 1)
