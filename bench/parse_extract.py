"""Micro-benchmark: CPU per message of parsing and text extraction, old against new (issue 20).

    .venv/bin/python -m bench.parse_extract [--baseline REV] [--rounds 7] [--messages 200]
                                            [--json FILE]

What the pipeline does with every received message between the DATA and the store,
besides authentication and scanning: message.parse_message, then the new text
(pipeline.text_extraction: extract/reply.py, html_text.py for HTML-only mail). The
baseline is the same code at an earlier revision (default ea5b4ba, before issue 20's
changes), loaded from `git show` into a private package, with the pipeline's calls
as they were then (unwrap_lines to choose a thread, then message_text). Both run in
this one process on the same messages, in alternating rounds (old first in odd
rounds, new first in even ones); CPU time is time.process_time, so a busy machine
slows both alike, and the figure that counts is the ratio new/old within a round
(the median over rounds is reported). Before timing, both must give the same
ParsedMessage fields and the same extracted text for every message.

Messages: bench/run.py's (DKIM-signed, 5 KB of text; 50 KB with a base64
attachment, half of it text), a quoted reply thread (a Gmail-style answer over
twelve levels of quotes) and an HTML-only message (quoted-printable, with the
answered mail in a gmail_quote div).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smtpd_agent.config import ContentSettings  # noqa: E402
from smtpd_agent.message import parse_message  # noqa: E402
from smtpd_agent.pipeline import (  # noqa: E402
    EXTRACT_IN_THREAD_ABOVE,
    EXTRACT_INLINE_LINES,
    text_extraction,
)

BASELINE = "ea5b4ba"  # main before issue 20's parse and extraction changes
SENDER = "sender.bench.test"
OLD_FILES = ("smtpd_agent/message.py", "smtpd_agent/extract/reply.py",
             "smtpd_agent/extract/html_text.py")


def _signed(raw: bytes, key) -> bytes:
    from tests.auth.keys import sign

    return sign(raw, key, SENDER)


def _head(kind: str, index: int, extra: str = "") -> str:
    return (f"From: Alice Smith <alice@{SENDER}>\r\nTo: inbox@load.bench.test\r\n"
            f"Subject: Re: {kind} {index}\r\nDate: Sat, 21 Nov 2026 05:00:00 +0000\r\n"
            f"Message-ID: <{kind}-{index}-{time.time_ns()}@{SENDER}>\r\n"
            f"In-Reply-To: <prev-{index}@example.org>\r\n"
            f"References: <root-{index}@example.org> <prev-{index}@example.org>\r\n{extra}")


def thread_message(index: int, key) -> bytes:
    """A reply on top of a thread of twelve answers, each quoting the ones before."""
    lines = ["Thanks Bob, Thursday at ten works for me; I will bring the figures.", "",
             "Alice", ""]
    for depth in range(1, 13):
        quote = "> " * depth
        lines += [f"{quote}On Fri, 20 Nov 2026 at {depth:02d}:14, Person {depth} "
                  f"<p{depth}@example.org> wrote:"]
        lines += [f"{quote}{'>' if depth < 12 else ''} Point {depth}.{n}: the schedule moves "
                  "again, see the attached plan and the notes from Tuesday."
                  for n in range(4)]
        lines += [f"{quote}"]
    body = "\r\n".join(lines) + "\r\n"
    raw = (_head("thread", index, "MIME-Version: 1.0\r\n"
                 "Content-Type: text/plain; charset=utf-8\r\n") + "\r\n" + body).encode()
    return _signed(raw, key)


def html_message(index: int, key) -> bytes:
    """HTML only (no text part), quoted-printable, the answered mail in a gmail_quote."""
    para = ("<p>The quarterly figures are in the shared folder; the totals for "
            "&eacute;t&eacute; differ from the draft by 3%.</p>\n")
    html = ("<html><head><style>p { margin: 0 }</style></head><body>"
            "<div dir=\"ltr\">Thursday works, <b>thanks</b>.<br>Alice</div>\n"
            "<div class=\"gmail_quote\"><div class=\"gmail_attr\">On Fri, Nov 20, 2026 "
            "Bob &lt;bob@example.org&gt; wrote:<br></div><blockquote class=\"gmail_quote\">"
            + para * 40 + "</blockquote></div></body></html>\n")
    qp = html.replace("=", "=3D").replace("\n", "\r\n")
    raw = (_head("html", index, "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
                 "Content-Transfer-Encoding: quoted-printable\r\n") + "\r\n" + qp).encode()
    return _signed(raw, key)


def message_sets(count: int) -> dict[str, list[bytes]]:
    """`count` unique messages of each kind, as the server has them after DATA."""
    from bench.run import make_payloads
    from tests.auth.keys import rsa_key

    key = rsa_key(2048)

    def undotted(payloads: list[bytes]) -> list[bytes]:
        return [p.replace(b"\r\n..", b"\r\n.") for p in payloads]

    return {
        "5 KB (bench/run.py)": undotted(make_payloads(count, 5000, False, key)),
        "50 KB with attachment": undotted(make_payloads(count, 50000, True, key)),
        "quoted reply thread": [thread_message(i, key) for i in range(count)],
        "HTML only": [html_message(i, key) for i in range(count)],
    }


def messages(count: int = 1) -> dict[str, bytes]:
    """One message of each kind (tests use them)."""
    return {name: raws[0] for name, raws in message_sets(count).items()}


# Bodies that make a line-by-line or a find-by-find search do the most work, each filling
# content.extract_max_input (64 KB): the new text of each is timed old against new.
HOSTILE = {
    "32,000 lines of \"-\"": "Hi\n" + "-\n" * 32000,
    "16,000 lines of \"--x\"": "Hi\n" + "--x\n" * 16000,
    "hyphenated words": "Hi\n" + "a - b - c - d - e\n" * 3500,
    "\":\" past LINE_PROBE": ("x" * 1200 + ":\n") * 54,
    "\":\" past max_lines": "a\n" * 600 + ":\n" * 10000,
    "one line of \"-\"": "-" * 65536,
    "\"_a\" repeated": "_a" * 32768,
    "empty lines": "\n" * 65536,
    "bare CR": "a\r" * 32768,
}


def load_baseline(rev: str, into: Path) -> tuple[ModuleType, ModuleType]:
    """message.py and extract/ at `rev`, as the package `baseline_<rev>`."""
    package = f"baseline_{rev.replace('-', '_').replace('.', '_')}"
    for path in OLD_FILES:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True,
                                capture_output=True).stdout
        target = into / package / Path(path).relative_to("smtpd_agent")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source)
    (into / package / "__init__.py").write_text("")
    (into / package / "extract" / "__init__.py").write_text("")
    sys.path.insert(0, str(into))
    return (importlib.import_module(f"{package}.message"),
            importlib.import_module(f"{package}.extract.reply"))


def old_path(message: ModuleType, reply: ModuleType,
             content: ContentSettings) -> Callable[[bytes], tuple]:
    """Parse and extract as the pipeline did at the baseline (pipeline.extract_text)."""

    def run(raw: bytes) -> tuple:
        parsed = message.parse_message(raw)
        text, html = parsed.text_body, parsed.html_body
        size = len(text or "") or len(html or "")
        in_thread = size > EXTRACT_IN_THREAD_ABOVE and not (
            text and text.strip()
            and reply.unwrap_lines(text, content.extract_max_input,
                                   content.extract_max_lines) <= EXTRACT_INLINE_LINES)
        result = reply.message_text(text, html, content.extract_max_input,
                                    content.extract_max_lines, content.extract_max_chars,
                                    content.html_max_input)
        return parsed, result.text, in_thread

    return run


def new_path(content: ContentSettings) -> Callable[[bytes], tuple]:
    def run(raw: bytes) -> tuple:
        parsed = parse_message(raw)
        extract, in_thread = text_extraction(parsed, content)
        return parsed, extract().text, in_thread

    return run


def comparable(parsed) -> tuple:
    return (parsed.headers, parsed.message_id, parsed.in_reply_to, parsed.references,
            parsed.from_header, parsed.from_address, parsed.to_header, parsed.cc_header,
            parsed.reply_to, parsed.subject, parsed.date, parsed.text_body, parsed.html_body,
            tuple((a.filename, a.content_type, a.content, a.disposition, a.content_id)
                  for a in parsed.attachments), parsed.defects)


def cpu_per_message(run: Callable[[bytes], tuple], raws: list[bytes]) -> float:
    gc.collect()
    began = time.process_time()
    for raw in raws:
        run(raw)
    return (time.process_time() - began) / len(raws) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args()
    content = ContentSettings()
    sets = message_sets(args.messages)
    with tempfile.TemporaryDirectory() as temp:
        old_message, old_reply = load_baseline(args.baseline, Path(temp))
        paths = {"old": old_path(old_message, old_reply, content), "new": new_path(content)}
        for name, raws in sets.items():
            for raw in raws[:20]:
                old, new = paths["old"](raw), paths["new"](raw)
                if (comparable(old[0]), old[1:]) != (comparable(new[0]), new[1:]):
                    raise SystemExit(f"{name}: old and new differ")
        figures: dict[str, dict[str, list[float]]] = {
            name: {"old": [], "new": []} for name in sets}
        for round_ in range(args.rounds):
            order = ("old", "new") if round_ % 2 == 0 else ("new", "old")
            for name, raws in sets.items():
                for which in order:
                    figures[name][which].append(cpu_per_message(paths[which], raws))
    print(f"CPU per message, parse + text extraction (us); baseline {args.baseline}, "
          f"{args.rounds} rounds x {args.messages} messages; ratio: median of new/old per round")
    print(f"{'message':24} {'bytes':>7} {'old us':>9} {'new us':>9} {'new/old':>8} "
          f"{'range of ratios':>17}")
    report = {}
    for name, runs in figures.items():
        ratios = [n / o for n, o in zip(runs["new"], runs["old"])]
        size = statistics.mean(len(r) for r in sets[name])
        report[name] = {"bytes": size, "old_us": statistics.median(runs["old"]),
                        "new_us": statistics.median(runs["new"]),
                        "ratio": statistics.median(ratios), "ratios": ratios}
        print(f"{name:24} {size:7.0f} {report[name]['old_us']:9.1f} "
              f"{report[name]['new_us']:9.1f} {report[name]['ratio']:8.2f} "
              f"{min(ratios):8.2f}-{max(ratios):.2f}")
    print(f"\nHostile bodies, new text alone (ms, best of 3) {'old':>9} {'new':>8}")
    hostile = hostile_times(old_reply, content)
    for name, times in hostile.items():
        print(f"{name:48} {times['old']:8.2f} {times['new']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": args.baseline, "rounds": args.rounds,
                                               "messages": args.messages, "figures": report,
                                               "hostile_ms": hostile}, indent=2))


def hostile_times(old_reply: ModuleType, content: ContentSettings) -> dict[str, dict]:
    """CPU ms of new_text on each HOSTILE body, the baseline's and ours, best of three."""
    from smtpd_agent.extract import reply

    bounds = (content.extract_max_input, content.extract_max_lines, content.extract_max_chars)
    times: dict[str, dict] = {}
    for name, text in HOSTILE.items():
        times[name] = {}
        for which, module in (("old", old_reply), ("new", reply)):
            runs = []
            for _ in range(3):
                began = time.process_time()
                module.new_text(text, *bounds)
                runs.append((time.process_time() - began) * 1000)
            times[name][which] = min(runs)
    return times

if __name__ == "__main__":
    main()
