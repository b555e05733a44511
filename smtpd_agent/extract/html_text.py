"""HTML reduced to its text: for the prompt, for extracted_text, for text/html attachments.

Place: the standards layer (the agent's prompt and the inbound content step both use it).
stdlib's HTMLParser, fed at most a bounded prefix: it is quadratic on some malformed input
(runs of "</" or "<?" with no ">"), so callers cap what they pass (content.html_max_input).

With `drop_quotes`, what mail clients mark as quoted history is left out: <blockquote>
(Apple Mail, Thunderbird: type="cite"), Gmail's div.gmail_quote, Thunderbird's
div.moz-cite-prefix, Yahoo's div.yahoo_quoted, and, from Outlook on the web's
div#divRplyFwdMsg (the "From: / Sent: / To:" block of the message answered) on, everything
after it; signatures the client marks (div.gmail_signature, div.moz-signature) as well.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_SCRIPTS = frozenset({"script", "style", "head", "title"})
_BREAKS = frozenset({"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6",
                     "blockquote", "hr", "table", "ul", "ol", "pre"})
# Elements that cannot have content: never the root of a skipped subtree.
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "source", "track", "wbr"})
QUOTE_CLASSES = frozenset({"gmail_quote", "gmail_quote_container", "moz-cite-prefix",
                           "yahoo_quoted", "gmail_signature", "moz-signature"})
# Outlook on the web (and new Outlook): the answered message's header block; what follows
# it is the answered message.
HISTORY_IDS = frozenset({"divrplyfwdmsg", "appendonsend", "mail-editor-reference-message-container"})
BLANK_LINES = re.compile(r"\n{3,}")


class _TextOfHtml(HTMLParser):
    def __init__(self, drop_quotes: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.drop_quotes = drop_quotes
        self.history = False  # Outlook's reply header seen: nothing after it is new
        self._scripts = 0
        self._skip_tag: str | None = None  # the element being skipped, and its nesting
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.history:
            return
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth += 1
            return
        if tag in _SCRIPTS:
            self._scripts += 1
            return
        if self.drop_quotes and tag not in _VOID and self._is_quote(tag, attrs):
            self._skip_tag, self._skip_depth = tag, 1
            self.parts.append("\n")
            return
        if tag in _BREAKS:
            self.parts.append("\n")

    def _is_quote(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag == "blockquote":
            return True
        for name, value in attrs:
            if name == "id" and (value or "").lower() in HISTORY_IDS:
                self.history = True
                return True
            if name == "class" and QUOTE_CLASSES.intersection((value or "").lower().split()):
                return True
        return False

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag in _SCRIPTS and self._scripts:
            self._scripts -= 1
        elif tag in _BREAKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not (self._scripts or self.history or self._skip_tag is not None):
            self.parts.append(data)


def html_to_text(html: str, drop_quotes: bool = False) -> str:
    """The text of `html`, blocks on lines of their own, runs of blank lines folded."""
    parser = _TextOfHtml(drop_quotes)
    parser.feed(html)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).replace("\xa0", " ").split("\n")]
    return BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def body_text(text_body: str | None, html_body: str | None) -> str:
    """The text part, else the HTML part reduced to its text."""
    if text_body and text_body.strip():
        return text_body
    if html_body:
        return html_to_text(html_body)
    return ""


def strip_tags(html: str) -> str:
    """Tags removed by a linear scan (no parser, no regex): the fallback when parsing failed."""
    out: list[str] = []
    at = 0
    while True:
        start = html.find("<", at)
        if start < 0:
            out.append(html[at:])
            break
        out.append(html[at:start])
        end = html.find(">", start)
        if end < 0:
            break
        out.append(" ")
        at = end + 1
    return " ".join("".join(out).split())
