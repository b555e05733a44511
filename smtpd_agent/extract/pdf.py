"""The text of a PDF, as a child process: `python -m smtpd_agent.extract.pdf`.

Place: the standards layer; attachment.py starts it once per request. A crafted PDF can
make a parser loop, recurse or allocate without end (pypdf is pure Python, and a thread
cannot be stopped), so the parse runs here, in a process of its own that the parent kills
at its deadline, with its address space and CPU time capped by setrlimit as a second bound.

Reads the PDF from stdin; writes one JSON object to stdout:
{"text", "pages" (read), "page_count", "truncated"} or {"error"}; exit status 0 either way
(a non-zero status or no JSON means the process was killed or crashed).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import resource
import sys
import warnings

MAX_PAGE_CHARS = 1_000_000


def limit_resources(memory_mb: int, cpu_seconds: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 1024 * 1024,) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))


def extract(data: bytes, max_pages: int, max_chars: int) -> dict[str, object]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            return {"error": "the PDF is encrypted"}
        page_count = len(reader.pages)
        parts: list[str] = []
        size = 0
        read = 0
        for page in reader.pages[:max_pages]:
            text = (page.extract_text() or "")[:MAX_PAGE_CHARS]
            parts.append(text)
            size += len(text) + 2
            read += 1
            if size > max_chars:
                break
    except (PyPdfError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            AssertionError, OSError, RecursionError, ZeroDivisionError) as error:
        return {"error": f"not a readable PDF ({type(error).__name__})"}
    text = "\n\n".join(parts).strip()
    return {"text": text[:max_chars], "pages": read, "page_count": page_count,
            "truncated": len(text) > max_chars or read < page_count}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-pages", type=int, required=True)
    parser.add_argument("--max-chars", type=int, required=True)
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--cpu-seconds", type=int, required=True)
    args = parser.parse_args()
    limit_resources(args.memory_mb, args.cpu_seconds)
    logging.disable(logging.CRITICAL)  # pypdf logs every oddity of a malformed file
    warnings.simplefilter("ignore")
    data = sys.stdin.buffer.read()
    try:
        result = extract(data, args.max_pages, args.max_chars)
    except MemoryError:
        result = {"error": "the PDF needs more memory than allowed"}
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
