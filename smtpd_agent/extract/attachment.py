"""An attachment's text on request: text/* decoded, text/html as text, PDFs through pdf.py.

Place: the standards layer; the inbox API's GET .../attachments/<id>/text calls it. Every
answer is bounded: at most `max_chars` characters, of at most `max_bytes` of input. A PDF is
parsed in a child process (pdf.py) killed at `pdf_timeout` seconds, with its memory and CPU
time capped; at most `pdf_workers` such processes run at once, and a request that cannot
get one within the same deadline is told to retry. Other types have no text here.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from enum import Enum

import structlog

from .html_text import html_to_text

log = structlog.get_logger(__name__)

PDF_TYPES = frozenset({"application/pdf", "application/x-pdf"})
# The child's JSON is our own code's output for at most max_chars characters of text:
# at most 6 bytes a character once escaped, plus the other fields.
JSON_OVERHEAD = 4096


class Failure(Enum):
    """Why an attachment has no text to give."""

    UNSUPPORTED = "unsupported type"  # not text/*, not a PDF
    TOO_LARGE = "too large to extract"
    UNREADABLE = "unreadable"  # malformed, encrypted, or the parser failed
    TIMEOUT = "timed out"  # the parse took longer than allowed (killed)
    BUSY = "busy"  # every extraction process was taken for the whole deadline


@dataclass(frozen=True)
class Extracted:
    text: str
    truncated: bool
    pages: int | None = None  # PDFs: pages read, and pages in the file
    page_count: int | None = None


class ExtractionError(Exception):
    def __init__(self, failure: Failure, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_chars: int
    pdf_max_pages: int
    pdf_timeout: float
    pdf_memory_mb: int


def decode_text(content: bytes) -> str:
    """UTF-8 when it is (a BOM is dropped), else Latin-1: every byte is some character."""
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError:
        return content.decode("latin-1")


class AttachmentText:
    """The extractor; one per HTTP server, holding the bound on concurrent PDF processes."""

    def __init__(self, limits: Limits, pdf_workers: int) -> None:
        self.limits = limits
        self._workers = asyncio.Semaphore(max(1, pdf_workers))

    async def extract(self, content_type: str, content: bytes) -> Extracted:
        """Raise ExtractionError when there is no text to give."""
        kind = (content_type or "").lower()
        limits = self.limits
        if kind in PDF_TYPES:
            if len(content) > limits.max_bytes:
                raise ExtractionError(Failure.TOO_LARGE,
                                      f"PDFs above {limits.max_bytes} bytes are not read")
            return await self._pdf(content)
        if not kind.startswith("text/"):
            raise ExtractionError(Failure.UNSUPPORTED,
                                  f"no text extraction for {kind or 'this type'}; "
                                  "text/* and application/pdf have text")
        head = content[:limits.max_bytes]
        text = decode_text(head)
        if kind == "text/html":
            text = html_to_text(text)
        cut = len(content) > limits.max_bytes or len(text) > limits.max_chars
        return Extracted(text[:limits.max_chars], cut)

    async def _pdf(self, content: bytes) -> Extracted:
        limits = self.limits
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.pdf_timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._workers.acquire()
        except TimeoutError:
            raise ExtractionError(Failure.BUSY, "every PDF extraction is in use; retry") from None
        try:
            return await self._run_child(content, deadline)
        finally:
            self._workers.release()

    async def _run_child(self, content: bytes, deadline: float) -> Extracted:
        limits = self.limits
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-m", "smtpd_agent.extract.pdf",
            "--max-pages", str(limits.pdf_max_pages), "--max-chars", str(limits.max_chars),
            "--memory-mb", str(limits.pdf_memory_mb),
            "--cpu-seconds", str(max(1, int(limits.pdf_timeout + 1))),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            async with asyncio.timeout_at(deadline):
                output, _ = await process.communicate(content)
        except TimeoutError:
            log.warning("attachment_text.pdf_timeout", pid=process.pid,
                        seconds=limits.pdf_timeout)
            raise ExtractionError(Failure.TIMEOUT, f"the PDF took longer than "
                                  f"{limits.pdf_timeout:g} s to read") from None
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        try:
            result = json.loads(output[:limits.max_chars * 6 + JSON_OVERHEAD])
        except ValueError:
            log.warning("attachment_text.pdf_crashed", returncode=process.returncode)
            raise ExtractionError(Failure.UNREADABLE, "the PDF could not be read "
                                  "within the memory and CPU allowed") from None
        if "error" in result:
            raise ExtractionError(Failure.UNREADABLE, str(result["error"]))
        return Extracted(str(result["text"]), bool(result["truncated"]),
                         int(result["pages"]), int(result["page_count"]))
