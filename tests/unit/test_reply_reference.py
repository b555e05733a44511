"""extract/reply.py gives exactly what its line-by-line implementation gave (issue 20).

The functions below named reference_* are that implementation, vendored as the oracle
(smtpd_agent/extract/reply.py at ea5b4ba): each line probed with a generator over the
markers, the signature found by a loop over the lines, every line rstripped one by one.
The new one searches the joined text with str.find and splits once. Every output field
(text, quoted, signature, truncated) and unwrap_lines must be equal, on generated texts
(quote intros, quoted runs, separators, blank and whitespace-only lines, CRLF/CR/LF, lines
around LINE_PROBE long, unicode line breaks and spaces) and on the common clients' replies.
"""

from __future__ import annotations

from dataclasses import astuple

import quotequail
from hypothesis import example, given, settings
from hypothesis import strategies as st

from smtpd_agent.config import ContentSettings
from smtpd_agent.extract.html_text import html_to_text
from smtpd_agent.extract.reply import (
    LINE_PROBE,
    SIGNATURE_SEPARATORS,
    UNWRAP_MARKERS,
    Body,
    message_text,
    new_text,
    unwrap_lines,
)
from smtpd_agent.message import parse_message
from smtpd_agent.pipeline import EXTRACT_IN_THREAD_ABOVE, EXTRACT_INLINE_LINES, text_extraction
from tests.replies import REPLIES

# --- the reference: reply.py's functions as they were, unchanged but for their names ---


def reference_new_text(text: str, max_input: int, max_lines: int,
                       max_chars: int) -> tuple[str, bool, bool, bool]:
    lines = reference_lines(text, max_input)
    probe = reference_probe(lines, max_lines)
    skip = reference_unwrap_skip(probe)
    found = None if skip is None else quotequail.unwrap("\n".join(probe[skip:]))
    kept, quoted = lines, False
    if found is not None:
        top, bottom = found.get("text_top"), found.get("text_bottom")
        if top:
            top_end = skip + reference_leading_blank(probe[skip:]) + top.count("\n") + 1
        else:
            top_end = skip - reference_leading_blank(probe[skip - 1::-1]) if skip else 0
        kept = lines[:top_end]
        if bottom:
            start = len(probe) - reference_leading_blank(probe[::-1]) - bottom.count("\n") - 1
            kept += ([""] if kept else []) + lines[start:]
        quoted = True
    kept, signature = reference_without_signature(kept)
    result = "\n".join(line.rstrip() for line in kept).strip()
    if not result:
        result, quoted, signature = "\n".join(lines).strip(), False, False
    truncated = len(result) > max_chars or len(text) > max_input
    return result[:max_chars], quoted, signature, truncated


def reference_unwrap_lines(text: str, max_input: int, max_lines: int) -> int:
    probe = reference_probe(reference_lines(text, max_input), max_lines)
    skip = reference_unwrap_skip(probe)
    return 0 if skip is None else len(probe) - skip


def reference_lines(text: str, max_input: int) -> list[str]:
    return text[:max_input].replace("\r\n", "\n").replace("\r", "\n").split("\n")


def reference_probe(lines: list[str], max_lines: int) -> list[str]:
    return [line[:LINE_PROBE] for line in lines[:max_lines]]


def reference_unwrap_skip(probe: list[str]) -> int | None:
    for index, line in enumerate(probe):
        if any(marker in line for marker in UNWRAP_MARKERS):
            return max(0, index - 1)
    return None


def reference_leading_blank(lines: list[str]) -> int:
    count = 0
    for line in lines:
        if line.strip():
            break
        count += 1
    return count


def reference_without_signature(lines: list[str]) -> tuple[list[str], bool]:
    seen_text = False
    for index, line in enumerate(lines):
        if seen_text and line in SIGNATURE_SEPARATORS:
            return lines[:index], True
        seen_text = seen_text or bool(line.strip())
    return lines, False


# --- generated texts ---

LINES = [
    "Thanks, Thursday works for me.",
    "On Mon, Nov 30, 2026 at 9:14 AM Alice <a@example.com> wrote:",
    "On Mon, Nov 30, 2026 Alice", "wrote:", "> Can we meet?", ">> deeper", "> ", ">",
    "-----Original Message-----", "From: Alice Smith <alice@example.com>",
    "Sent: Monday, November 30, 2026 9:14 AM", "To: Bob", "Subject: plans", "_" * 32,
    "---------- Forwarded message ---------", "Begin forwarded message:",
    "2026/11/30 Alice <alice@example.com>", "-- ", "--", " -- ", "-- x", "---", "- item",
    "a - b", "x_y", "see https://example.com/x", "Best,", "Bob", "", " ", "\t", "  \t ",
    "trailing space   ", "Grüße, Jörg", "日本語のテキスト", "emoji 🙂 ok", "\xa0", "\u3000",
    "\x0b", "\x0c", "\x1c", "x\x1d", "\x1e", "a\x85b", "\u2028", "x\u2029", "\x1f",
]
# characters the implementations treat specially, for free-form lines
ALPHABET = st.sampled_from(list(":>@-_ \t\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u2028\u2029\u3000é日🙂")
                           + list("abcXYZ019,."))
FREE_LINE = st.text(ALPHABET, max_size=40)
# a line near LINE_PROBE long with a marker around the probe's end: in it, or just past
LONG_LINE = st.builds(lambda pad, marker, tail: "x" * pad + marker + tail,
                      st.integers(LINE_PROBE - 4, LINE_PROBE + 2),
                      st.sampled_from([*UNWRAP_MARKERS, "-", "_", "--"]),
                      st.sampled_from(["", " wrote:", "x"]))
LINE = st.one_of(st.sampled_from(LINES), FREE_LINE, LONG_LINE)
BREAK = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def texts(draw: st.DrawFn) -> str:
    lines = draw(st.lists(LINE, max_size=25))
    if draw(st.booleans()):  # one line break for the whole text, as most mail has
        return draw(BREAK).join(lines) + draw(st.sampled_from(["", "\n", "\r\n", "\r"]))
    return "".join(line + draw(BREAK) for line in lines)


BOUNDS = st.tuples(st.one_of(st.just(65_536), st.integers(1, 3000)),
                   st.one_of(st.just(500), st.integers(1, 30)),
                   st.one_of(st.just(20_000), st.integers(1, 400)))


def same(text: str, max_input: int, max_lines: int, max_chars: int) -> None:
    expected = reference_new_text(text, max_input, max_lines, max_chars)
    assert astuple(new_text(text, max_input, max_lines, max_chars)) == expected
    assert unwrap_lines(text, max_input, max_lines) == reference_unwrap_lines(
        text, max_input, max_lines)
    body = Body(text, max_input, max_lines)  # the pipeline's way: measure, then extract
    assert body.unwrap_lines == reference_unwrap_lines(text, max_input, max_lines)
    assert astuple(body.new_text(max_chars)) == expected


@settings(max_examples=1500, deadline=None)
@given(texts(), BOUNDS)
@example("Thanks.\r\nOn Mon, Nov 30, 2026 Alice\r\nwrote:\r\n> old\r\n", (65_536, 500, 20_000))
@example("", (65_536, 500, 20_000))
@example("\r", (65_536, 500, 20_000))
@example("a\r\n", (2, 500, 20_000))  # max_input cuts a CRLF in two
@example("Hi\n--\nsig", (65_536, 500, 20_000))
@example("--\nHi\n-- \nsig", (65_536, 500, 20_000))
@example(" \n\u2028--\nx", (65_536, 500, 20_000))
@example("x" * (LINE_PROBE - 1) + ":\nnext", (65_536, 500, 20_000))
@example("x" * LINE_PROBE + ":\nnext", (65_536, 500, 20_000))
@example("x" * (LINE_PROBE - 2) + "---\nnext", (65_536, 500, 20_000))
def test_new_text_is_what_the_line_by_line_implementation_gave(text, bounds):
    same(text, *bounds)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), BOUNDS)
def test_the_same_on_any_text(text, bounds):
    same(text, *bounds)


def test_the_same_on_common_clients_replies_and_threads():
    bodies = [r.text if r.text else html_to_text(r.html or "", drop_quotes=True)
              for r in REPLIES]
    thread = "\n".join(f"{'> ' * depth}On day {depth}, P{depth} <p{depth}@example.com> wrote:\n"
                       f"{'> ' * (depth + 1)}Point {depth}, as we said.\n" for depth in range(12))
    bodies += [thread, "Short answer.\n\n" + thread, "Signed.\n-- \nBob\n" + thread]
    for body in bodies:
        for variant in (body, body.replace("\n", "\r\n"), body.replace("\n", "\r")):
            for bounds in ((65_536, 500, 20_000), (200, 500, 20_000), (65_536, 3, 20_000),
                           (65_536, 500, 10)):
                same(variant, *bounds)


def reference_pipeline(raw: bytes, content: ContentSettings) -> tuple[str, bool]:
    """What pipeline.extract_text did (ea5b4ba): the text stored, and whether in a thread."""
    parsed = parse_message(raw)
    text, html = parsed.text_body, parsed.html_body
    size = len(text or "") or len(html or "")
    in_thread = size > EXTRACT_IN_THREAD_ABOVE and not (
        text and text.strip() and reference_unwrap_lines(
            text, content.extract_max_input, content.extract_max_lines) <= EXTRACT_INLINE_LINES)
    if text and text.strip():
        stored = reference_new_text(text, content.extract_max_input, content.extract_max_lines,
                                    content.extract_max_chars)[0]
    else:
        stored = message_text(text, html, content.extract_max_input, content.extract_max_lines,
                              content.extract_max_chars, content.html_max_input).text
    return stored, in_thread


def test_the_pipeline_stores_the_same_text_and_picks_the_same_thread():
    content = ContentSettings()
    filler = "The quick brown fox jumps over the lazy dog, again and again.\r\n"
    quoted = "".join(f"> quoted line {n}: {filler}" for n in range(40))
    raws = [
        b"Subject: plain\r\n\r\n" + (filler * 80).encode(),
        b"Subject: reply\r\n\r\nYes.\r\n\r\nOn Mon, Nov 30, 2026 Alice wrote:\r\n"
        + quoted.encode(),
        b"Subject: short reply\r\n\r\nYes.\r\nOn Mon, Alice wrote:\r\n> ok\r\n",
        b"Subject: blank text\r\n\r\n   \r\n",
        b"Content-Type: text/html\r\n\r\n<p>" + (filler * 60).encode() + b"</p>",
        b"Content-Type: text/html\r\n\r\n<p>Hi</p><blockquote>old</blockquote>",
        b"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: text/plain\r\n\r\n  \r\n--b\r\nContent-Type: text/html\r\n\r\n"
        b"<p>" + (filler * 60).encode() + b"</p>\r\n--b--\r\n",
    ]
    for raw in raws:
        parsed = parse_message(raw)
        extract, in_thread = text_extraction(parsed, content)
        assert (extract().text, in_thread) == reference_pipeline(raw, content), raw[:40]
    # both decisions happen: the set above is not all one way
    assert {text_extraction(parse_message(r), content)[1] for r in raws} == {True, False}


def test_the_same_on_the_benchmarks_hostile_bodies():
    """The 64 KB bodies bench/parse_extract.py times (long runs of "-" and "--x" lines,
    markers past LINE_PROBE and past max_lines, empty lines, bare CRs)."""
    from bench.parse_extract import HOSTILE

    for text in HOSTILE.values():
        same(text, 65_536, 500, 20_000)
        same(text, 65_536, 500, 100)
