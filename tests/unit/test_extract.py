"""extract/: a message's new text, HTML as text, an attachment's text; pure, bounded."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from smtpd_agent.extract.attachment import (
    AttachmentText,
    ExtractionError,
    Failure,
    Limits,
    decode_text,
)
from smtpd_agent.extract.html_text import html_to_text, strip_tags
from smtpd_agent.extract.reply import message_text, new_text
from tests.replies import APPLE, NO_QUOTES, QUOTED, REPLIES, Reply

BOUNDS = {"max_input": 65_536, "max_lines": 500, "max_chars": 20_000}


def extracted(reply: Reply) -> str:
    return message_text(reply.text, reply.html, **BOUNDS, html_max_input=131_072).text


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: r.client)
def test_only_the_new_text_is_kept(reply):
    text = extracted(reply)
    assert reply.new in text
    assert QUOTED not in text
    if reply is not APPLE:  # Apple Mail's "Sent from my iPhone" stays: it is not quoted
        assert text == reply.new


def test_without_quotes_the_whole_text_stays():
    assert new_text(NO_QUOTES.text or "", **BOUNDS).quoted is False
    assert extracted(NO_QUOTES) == NO_QUOTES.text.strip()


def test_bottom_posting_keeps_the_answer_below_the_quote():
    text = "On 11/30/26 9:14 AM, Alice wrote:\n> Thursday? PURPLE\n> Or Friday?\n\nThursday.\n"
    assert new_text(text, **BOUNDS).text == "Thursday."


def test_a_bare_forward_keeps_its_whole_text():
    text = ("---------- Forwarded message ---------\nFrom: Carol <carol@example.com>\n"
            "Date: Mon, Nov 30, 2026\nSubject: Report\nTo: Bob <bob@example.org>\n\n"
            "The report is ready.\n")
    assert "The report is ready." in new_text(text, **BOUNDS).text


def test_long_lines_are_kept_whole_and_bounded_in_time():
    """A line far beyond RFC 5322's 998 characters is looked at by its start only (the
    gmail date pattern is quadratic on one long line), yet kept whole in the result."""
    hostile = "1234/1/12 " + " <" * 200_000 + "@"
    text = "New text.\n" + hostile + "\nOn Mon, Nov 30, 2026 Alice wrote:\n> old\n> older\n"
    began = time.monotonic()
    result = new_text(text, max_input=len(text), max_lines=500, max_chars=10**6)
    assert time.monotonic() - began < 2
    assert result.text == "New text.\n" + hostile and result.quoted


def test_input_and_output_are_bounded():
    text = "line of new text\n" * 10_000 + "On Mon, Alice wrote:\n> old\n"
    result = new_text(text, max_input=4096, max_lines=100, max_chars=1000)
    assert len(result.text) <= 1000 and result.truncated


def test_html_quotes_and_history_are_dropped_and_scripts_ignored():
    html = ("<p>New <i>words</i></p><script>evil()</script><blockquote type=cite>"
            "<blockquote>nested</blockquote>old</blockquote><p>after the quote</p>"
            "<div class='moz-cite-prefix'>On Monday Alice wrote:</div>")
    assert html_to_text(html, drop_quotes=True) == "New words\n\nafter the quote"
    assert "old" in html_to_text(html) and "evil" not in html_to_text(html)


def test_strip_tags_is_linear_on_unclosed_tags():
    began = time.monotonic()
    assert strip_tags("<" * 1_000_000) == ""
    assert strip_tags("a <b>bold</b> c") == "a bold c"
    assert time.monotonic() - began < 1


def test_decode_text_never_fails():
    assert decode_text("\ufeffgrüße".encode()) == "grüße"
    assert decode_text(b"caf\xe9") == "café"


LIMITS = Limits(max_bytes=1000, max_chars=50, pdf_max_pages=5, pdf_timeout=10.0,
                pdf_memory_mb=512)


async def test_attachment_text_of_text_html_and_other_types():
    texts = AttachmentText(LIMITS, 1)
    plain = await texts.extract("text/plain", b"hello")
    assert (plain.text, plain.truncated, plain.pages) == ("hello", False, None)
    long = await texts.extract("text/csv", b"x" * 5000)
    assert len(long.text) == 50 and long.truncated
    html = await texts.extract("text/html", b"<p>Hi</p><style>p{}</style>")
    assert html.text == "Hi"
    with pytest.raises(ExtractionError) as refused:
        await texts.extract("image/png", b"\x89PNG")
    assert refused.value.failure is Failure.UNSUPPORTED
    with pytest.raises(ExtractionError) as large:
        await texts.extract("application/pdf", b"%PDF" + b" " * 2000)
    assert large.value.failure is Failure.TOO_LARGE


async def test_busy_extraction_answers_busy_within_the_deadline():
    texts = AttachmentText(Limits(1000, 50, 5, 0.3, 512), 1)
    await texts._workers.acquire()  # the only worker is taken
    began = asyncio.get_running_loop().time()
    with pytest.raises(ExtractionError) as busy:
        await texts.extract("application/pdf", b"%PDF-1.4")
    assert busy.value.failure is Failure.BUSY
    assert asyncio.get_running_loop().time() - began < 1


def test_every_unwrap_pattern_needs_a_marker():
    """The shortcut in new_text is exact only while each of quotequail's patterns can match
    nothing without one of UNWRAP_MARKERS; a quotequail upgrade that adds one without it
    fails here instead of silently keeping quoted history."""
    import quotequail._patterns as patterns

    from smtpd_agent.extract.reply import UNWRAP_MARKERS

    for regex in [*patterns.COMPILED_PATTERNS, patterns.HEADER_RE]:
        source = regex.pattern.replace("(?:", "(")
        assert any(marker in source for marker in UNWRAP_MARKERS), regex.pattern


LINES = ["Thanks, sounds good.", "On Mon, Nov 30, 2026 Alice wrote:", "> quoted", ">> deeper",
         "From: Alice", "Sent: Monday", "To: Bob", "Subject: plans", "", "--", "-- ",
         "-----Original Message-----", "_" * 32, "2026/11/30 Alice <alice@example.com>",
         "Begin forwarded message:", "see https://example.com/x", "a - b", "x_y", "Bob",
         "   ", "Best,", "On Mon, Nov 30, 2026 Alice", "wrote:"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(LINES), max_size=30))
@example(["Thanks.", "On Mon, Nov 30, 2026 Alice", "wrote:", "old"])  # intro over two lines
def test_the_marker_shortcut_changes_no_result(lines):
    """Skipping marker-free text, and the lines before the first marker, gives what
    quotequail on the whole window gives."""
    import smtpd_agent.extract.reply as reply

    text = "\n".join(lines)
    shortcut = new_text(text, **BOUNDS)
    markers, reply.UNWRAP_MARKERS = reply.UNWRAP_MARKERS, ("",)  # "" is in every text
    try:
        assert new_text(text, **BOUNDS) == shortcut
    finally:
        reply.UNWRAP_MARKERS = markers


def test_unwrap_lines_measures_what_quotequail_is_given():
    """The pipeline keeps a body in the event loop when this is small: marker-free text is
    not handed to quotequail at all, and a reply only from the line before its intro on."""
    from smtpd_agent.extract.reply import unwrap_lines

    assert unwrap_lines("Plain words, no quote.\n" * 200, **{k: BOUNDS[k] for k in (
        "max_input", "max_lines")}) == 0
    text = "New text.\n" * 100 + "On Mon, Nov 30, 2026 Alice wrote:\n> old\n> older"
    assert unwrap_lines(text, 65_536, 500) == 4  # "New text.", the intro, two quoted lines
    assert unwrap_lines(text, 65_536, 50) == 0  # the intro is past max_lines
