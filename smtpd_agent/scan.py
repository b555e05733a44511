"""Stage 4 of the pipeline: virus scanning with clamd, between authenticate and store.

The pipeline calls `Scanner.scan_message()` once per message after
authentication, then the pure `decide()` turns the `ScanResult` into a
`ScanDecision`; smtp/replies.py maps a refusal's reason to its reply (SMTP, or
HTTP for a webhook), and the store keeps the result's status and signature per
message and per attachment. This module writes no replies and never imports a
listener.

Shaped like haraka-plugin-clamd: `instream()` and `command()` do the I/O and
return an outcome kind (connect_failed, timeout, io_error, done + clamd's
reply line); `parse_reply()`, `classify()`, `combine()` and `decide()` are
pure and tested table by table.

What is scanned. When a message has attachments (or always, with
`scan.scan_all`), each distinct attachment is streamed decoded, exactly as
the store will keep it and an agent will read it, and the whole raw message
is streamed too, so clamd's own MIME parser also sees what ours puts into
text bodies (uuencode, HTML) or interprets differently. Archives are unpacked
by clamd. Streams go out concurrently, bounded per Scanner.

Limits, and the documented outcome for a part too large to scan. A part is
never passed unscanned because of its size: it is REJECTED (decision
`reject`, reason `too_large`; suggested reply `552 5.3.4`), whatever
`scan.required` says. That applies when a stream exceeds
`scan.max_stream_size` (checked here, nothing is sent), when clamd answers
`INSTREAM size limit exceeded` (its StreamMaxLength), and when clamd flags
`Heuristics.Limits.Exceeded.*` (MaxFileSize/MaxScanSize/MaxRecursion with
`AlertExceedsMax yes`; without that option clamd silently answers OK for what
it skipped, so production clamd.conf must set it). A tempfail would only make
the sender retry the same bytes for days. Keep `smtp.max_message_size` <=
`scan.max_stream_size` <= clamd's StreamMaxLength (see `limit_problems()`):
the raw message is the largest stream (attachments are decoded, smaller than
their base64), so then no message the listener accepts is too large.

Failure is closed by default. clamd unreachable, timing out (one absolute
deadline of `scan.timeout` per message, queueing included) or answering an
error: `tempfail` (451 4.7.0), or `accept_unscanned` with
`scan.required = false`. Connections are per scan: a clamd that restarts is
used again on the next message, with no state to reset.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import structlog

from .config import ConfigError, ScanSettings, Settings
from .message import Attachment
from .record import InboundMessage

# INSTREAM chunks: 4-byte network-order length + data, ended by a zero length
# (man clamd). 64 KiB keeps the syscall count low and stays far below any
# sane StreamMaxLength, which a single chunk must not exceed.
CHUNK_SIZE = 64 * 1024
# Replies are one short line ("stream: <name> FOUND"); a bound on what a
# broken or hostile peer can make us buffer.
MAX_REPLY = 4096
# clamd's default MaxThreads; more concurrent streams only queue inside clamd.
DEFAULT_MAX_CONNECTIONS = 10
# Readiness probes answer fast or not at all.
HEALTH_TIMEOUT = 2.0

# Signatures clamd raises when a part exceeded its scan limits (AlertExceedsMax).
LIMITS_EXCEEDED_PREFIX = "Heuristics.Limits.Exceeded"
SIZE_LIMIT_REPLY = "INSTREAM size limit exceeded"

OutcomeKind = Literal["connect_failed", "timeout", "io_error", "done"]
# unscanned: clamd unreachable, timed out or dropped the connection (transient).
# error: clamd answered but could not scan (too_large, or its own error reply).
# skipped: not sent by policy (no attachments, scan.scan_all off); not a failure,
# kept apart from unscanned so the stored status never hides an outage.
ScanStatus = Literal["clean", "infected", "unscanned", "error", "skipped"]
# Why a part was not found clean (None when it was).
Problem = Literal["connect_failed", "timeout", "io_error", "too_large", "clamd_error", "bad_reply"]


class ScanAction(StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    ACCEPT_UNSCANNED = "accept_unscanned"


class ScanReason(StrEnum):
    """Why; for a refusal, the key of its reply in smtp/replies.py."""

    CLEAN = "clean"
    NOT_SCANNED = "not_scanned"
    VIRUS = "virus"
    TOO_LARGE = "too_large"
    SCANNER_UNAVAILABLE = "scanner_unavailable"
    SCANNER_ERROR = "scanner_error"


# --- addresses ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClamdAddress:
    """Where clamd listens: a Unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"tcp:[{self.host}]:{self.port}" if ":" in str(self.host) else \
            f"tcp:{self.host}:{self.port}"


def parse_address(spec: str) -> ClamdAddress:
    """`unix:/path`, `tcp:host:port` or `tcp:[v6]:port` (the `scan.clamd` setting)."""
    if spec.startswith("unix:") and len(spec) > len("unix:"):
        return ClamdAddress(path=spec[len("unix:"):])
    if spec.startswith("tcp:"):
        host, _, port = spec[len("tcp:"):].rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if host and port.isdigit() and 0 < int(port) < 65536:
            return ClamdAddress(host=host, port=int(port))
    raise ConfigError(f"scan.clamd: expected unix:/path or tcp:host:port, got {spec!r}")


def limit_problems(settings: Settings) -> list[str]:
    """Startup warnings when the scan limit cannot hold every message the listener accepts."""
    problems = []
    if settings.scan.max_stream_size < settings.smtp.max_message_size:
        problems.append(
            f"scan.max_stream_size ({settings.scan.max_stream_size}) is below "
            f"smtp.max_message_size ({settings.smtp.max_message_size}): messages in between "
            "will be rejected as too large to scan")
    return problems


# --- I/O: outcome kinds, no interpretation -----------------------------------------------------

@dataclass(frozen=True)
class ClamdOutcome:
    """What happened on the wire; `reply` is clamd's line when kind is `done`."""

    kind: OutcomeKind
    reply: str | None = None
    detail: str | None = None


async def _connect(address: ClamdAddress) -> socket.socket:
    """A connected non-blocking socket; ours to read after a failed write (see instream)."""
    loop = asyncio.get_running_loop()
    if address.path is not None:
        targets: list[tuple[int, str | tuple[Any, ...]]] = [(socket.AF_UNIX, address.path)]
    else:
        infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        targets = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    error: OSError = OSError(f"no address for {address}")
    for family, sockaddr in targets:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, sockaddr)
            return sock
        except OSError as failure:
            sock.close()
            error = failure
        except BaseException:
            sock.close()
            raise
    raise error


async def _read_reply(sock: socket.socket) -> str | None:
    """One NUL-terminated reply (we send z-commands); a reply cut short by EOF still counts."""
    loop = asyncio.get_running_loop()
    data = b""
    while b"\0" not in data and len(data) < MAX_REPLY:
        try:
            received = await loop.sock_recv(sock, MAX_REPLY - len(data))
        except OSError:
            break
        if not received:
            break
        data += received
    text = data.split(b"\0", 1)[0].rstrip(b"\r\n").decode("utf-8", "replace")
    return text or None


async def _exchange(address: ClamdAddress, request: Iterable[bytes],
                    deadline: float) -> ClamdOutcome:
    """Send `request` piece by piece, read one reply, all before `deadline` (loop time)."""
    loop = asyncio.get_running_loop()
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout_at(deadline):
            try:
                sock = await _connect(address)
            except OSError as error:
                return ClamdOutcome("connect_failed", detail=_describe(error))
            write_error: OSError | None = None
            try:
                for piece in request:
                    await loop.sock_sendall(sock, piece)
            except OSError as error:
                # clamd answers "INSTREAM size limit exceeded" and closes while we are
                # still sending: the reply sits in our receive buffer, so read it anyway.
                # (A StreamWriter would drop it when its write fails.)
                write_error = error
            reply = await _read_reply(sock)
            if reply is None:
                detail = _describe(write_error) if write_error else "closed without a reply"
                return ClamdOutcome("io_error", detail=detail)
            return ClamdOutcome("done", reply=reply)
    except TimeoutError:
        return ClamdOutcome("timeout", detail="deadline exceeded")
    except OSError as error:
        return ClamdOutcome("io_error", detail=_describe(error))
    finally:
        if sock is not None:
            sock.close()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _instream_request(data: bytes, chunk_size: int) -> Iterator[bytes]:
    """zINSTREAM, then <4-byte network-order length><chunk>..., then a zero length."""
    yield b"zINSTREAM\0"
    view = memoryview(data)
    for offset in range(0, len(view), chunk_size):
        chunk = view[offset:offset + chunk_size]
        yield struct.pack("!L", len(chunk)) + chunk
    yield struct.pack("!L", 0)


async def instream(address: ClamdAddress, data: bytes, deadline: float,
                   chunk_size: int = CHUNK_SIZE) -> ClamdOutcome:
    """Stream `data` to clamd with INSTREAM on a fresh connection."""
    return await _exchange(address, _instream_request(data, chunk_size), deadline)


async def command(address: ClamdAddress, name: str, deadline: float) -> ClamdOutcome:
    """A one-line command such as PING or VERSION on a fresh connection."""
    return await _exchange(address, [b"z" + name.encode("ascii") + b"\0"], deadline)


# --- pure: what clamd said, and what it means ----------------------------------------------------

@dataclass(frozen=True)
class ClamdReply:
    """One parsed reply line: `stream: OK`, `stream: <name> FOUND`, `<text> ERROR`."""

    kind: Literal["ok", "found", "error", "unknown"]
    signature: str | None = None
    message: str | None = None


# Optional "<id>: " (IDSESSION) and "stream: " prefixes, then the verdict.
_PREFIX = r"^(?:\d+: )?(?:stream: )?"
_FOUND = re.compile(_PREFIX + r"(?P<signature>\S+) FOUND$")
_OK = re.compile(_PREFIX + r"OK$")
_ERROR = re.compile(_PREFIX + r"(?P<message>.*?)\s*ERROR$")
# The signature ends up in an SMTP reply and in logs: visible ASCII only, bounded.
_UNSAFE = re.compile(r"[^\x21-\x7e]")


def parse_reply(line: str) -> ClamdReply:
    text = line.strip("\0\r\n ")
    if found := _FOUND.match(text):
        return ClamdReply("found", signature=_UNSAFE.sub("", found["signature"])[:200])
    if _OK.match(text):
        return ClamdReply("ok")
    if error := _ERROR.match(text):
        return ClamdReply("error", message=_UNSAFE.sub(" ", error["message"])[:200])
    return ClamdReply("unknown", message=_UNSAFE.sub(" ", text)[:200])


@dataclass(frozen=True)
class PartVerdict:
    """The scan status of one stream (or of several, combined)."""

    status: ScanStatus
    signature: str | None = None
    problem: Problem | None = None
    detail: str | None = None


CLEAN = PartVerdict("clean")
SKIPPED = PartVerdict("skipped")


def classify(outcome: ClamdOutcome) -> PartVerdict:
    """Outcome kind + reply -> status; unreachable clamd is `unscanned`, never clean."""
    if outcome.kind != "done":
        return PartVerdict("unscanned", problem=outcome.kind, detail=outcome.detail)
    reply = parse_reply(outcome.reply or "")
    if reply.kind == "ok":
        return CLEAN
    if reply.kind == "found" and reply.signature:
        if reply.signature.startswith(LIMITS_EXCEEDED_PREFIX):
            return PartVerdict("error", problem="too_large", detail=reply.signature)
        return PartVerdict("infected", signature=reply.signature)
    if reply.kind == "error":
        if (reply.message or "").startswith(SIZE_LIMIT_REPLY):
            return PartVerdict("error", problem="too_large", detail=reply.message)
        return PartVerdict("error", problem="clamd_error", detail=reply.message)
    return PartVerdict("error", problem="bad_reply", detail=reply.message)


# Worst first: one infected part decides the message, then limits, then outages.
_RANK: dict[ScanStatus, int] = {"infected": 0, "error": 1, "unscanned": 2, "clean": 3,
                                 "skipped": 4}


def combine(verdicts: Sequence[PartVerdict]) -> PartVerdict:
    """The message's verdict from its parts': the worst one (too_large before other errors)."""
    if not verdicts:
        return SKIPPED
    return min(verdicts, key=lambda v: (_RANK[v.status], v.problem != "too_large"))


# --- results and the decision ----------------------------------------------------------------

@dataclass(frozen=True)
class AttachmentResult:
    """One attachment of `ParsedMessage.attachments`, same index, as the store keeps it."""

    index: int
    filename: str | None
    content_type: str
    size: int
    sha256: str
    status: ScanStatus
    signature: str | None = None
    problem: Problem | None = None


@dataclass(frozen=True)
class ScanResult:
    """Everything the store keeps about a scan: per message and per attachment."""

    status: ScanStatus
    signature: str | None = None
    problem: Problem | None = None
    detail: str | None = None
    attachments: tuple[AttachmentResult, ...] = ()
    # The verdict on the whole raw message as clamd's MIME parser saw it.
    raw: PartVerdict | None = None
    elapsed: float = 0.0


@dataclass(frozen=True)
class ScanDecision:
    """What the pipeline should do with the message; the reply is smtp/replies.py's."""

    action: ScanAction
    reason: ScanReason
    signature: str | None = None


def decide(result: ScanResult, settings: ScanSettings) -> ScanDecision:
    """Pure: reject viruses and unscannable sizes, fail closed on outages unless not required."""
    if result.status == "skipped":
        return ScanDecision(ScanAction.ACCEPT, ScanReason.NOT_SCANNED)
    if result.status == "clean":
        return ScanDecision(ScanAction.ACCEPT, ScanReason.CLEAN)
    if result.status == "infected":
        return ScanDecision(ScanAction.REJECT, ScanReason.VIRUS, result.signature)
    if result.problem == "too_large":
        return ScanDecision(ScanAction.REJECT, ScanReason.TOO_LARGE)
    reason = (ScanReason.SCANNER_ERROR if result.status == "error"
              else ScanReason.SCANNER_UNAVAILABLE)
    return ScanDecision(ScanAction.TEMPFAIL if settings.required
                        else ScanAction.ACCEPT_UNSCANNED, reason)


@dataclass(frozen=True)
class ClamdHealth:
    """Readiness of the scanning stage: clamd answered PING with PONG."""

    ready: bool
    latency: float
    problem: str | None = None
    detail: str | None = None


# --- the stage -------------------------------------------------------------------------------

@dataclass
class Scanner:
    """One per server process (and event loop), built from `scan.*` settings.

    Holds no connection between scans, so nothing goes stale when clamd
    restarts; `max_connections` bounds the streams in flight to clamd.
    """

    settings: ScanSettings
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    address: ClamdAddress = field(init=False)
    _slots: asyncio.Semaphore = field(init=False, repr=False)
    _log: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.settings.clamd:
            raise ConfigError("scan.clamd: not set (unix:/path or tcp:host:port)")
        self.address = parse_address(self.settings.clamd)
        self._slots = asyncio.Semaphore(max(1, self.max_connections))
        self._log = structlog.get_logger(__name__).bind(clamd=str(self.address))

    def needs_scan(self, message: InboundMessage) -> bool:
        return bool(message.parsed.attachments) or self.settings.scan_all

    async def scan_message(self, message: InboundMessage) -> ScanResult:
        """Scan attachments and the raw message under one deadline of `scan.timeout`."""
        attachments = message.parsed.attachments
        envelope = message.envelope
        if not self.needs_scan(message):
            return ScanResult(status="skipped")
        began = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.settings.timeout
        # Identical attachments (a logo twice, a forwarded copy) are streamed once.
        contents = {a.content: None for a in attachments}
        streams = [message.raw, *contents]
        verdicts = await asyncio.gather(*(self.scan_bytes(data, deadline) for data in streams))
        raw_verdict, by_content = verdicts[0], dict(zip(contents, verdicts[1:], strict=True))
        parts = tuple(_attachment_result(i, a, by_content[a.content])
                      for i, a in enumerate(attachments))
        # Prefer an attachment's verdict: it names the part that was caught.
        overall = combine([*verdicts[1:], raw_verdict])
        result = ScanResult(status=overall.status, signature=overall.signature,
                            problem=overall.problem, detail=overall.detail, attachments=parts,
                            raw=raw_verdict, elapsed=time.monotonic() - began)
        self._log_result(result, envelope_fields=dict(
            session_id=envelope.session_id, client_ip=envelope.client_ip,
            mail_from=envelope.mail_from,
            rcpt_to=[r.address for r in envelope.recipients]))
        return result

    async def scan_bytes(self, data: bytes, deadline: float | None = None) -> PartVerdict:
        """One stream, with the size limit applied before anything is sent."""
        if len(data) > self.settings.max_stream_size:
            return PartVerdict("error", problem="too_large",
                               detail=f"{len(data)} bytes > scan.max_stream_size")
        if not data:
            return CLEAN  # nothing to match; clamd would only spend a connection on it
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.settings.timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            return PartVerdict("unscanned", problem="timeout", detail="waiting for a clamd slot")
        try:
            return classify(await instream(self.address, data, deadline))
        finally:
            self._slots.release()

    async def health(self, timeout: float = HEALTH_TIMEOUT) -> ClamdHealth:
        """PING -> PONG within `timeout`: part of the server's readiness."""
        began = time.monotonic()
        outcome = await command(self.address, "PING",
                                asyncio.get_running_loop().time() + timeout)
        latency = time.monotonic() - began
        if outcome.kind == "done" and outcome.reply == "PONG":
            return ClamdHealth(ready=True, latency=latency)
        problem = outcome.kind if outcome.kind != "done" else "bad_reply"
        detail = (outcome.detail if outcome.kind != "done"
                  else parse_reply(outcome.reply or "").message)
        self._log.warning("scan.clamd_unhealthy", problem=problem, detail=detail)
        return ClamdHealth(ready=False, latency=latency, problem=problem, detail=detail)

    def _log_result(self, result: ScanResult, envelope_fields: dict[str, object]) -> None:
        """Signature names and sizes only: message bodies never reach the log."""
        fields = dict(status=result.status, elapsed_ms=round(result.elapsed * 1000, 1),
                      attachments=len(result.attachments), **envelope_fields)
        if result.status == "infected":
            infected = [a.index for a in result.attachments if a.status == "infected"]
            self._log.warning("scan.infected", signature=result.signature,
                              infected_attachments=infected, **fields)
        elif result.status == "clean":
            self._log.debug("scan.clean", **fields)
        elif result.problem == "too_large":
            self._log.error("scan.too_large", detail=result.detail,
                            hint="keep clamd StreamMaxLength >= scan.max_stream_size "
                                 ">= smtp.max_message_size", **fields)
        else:
            self._log.warning("scan.failed", problem=result.problem, detail=result.detail,
                              **fields)


def _attachment_result(index: int, attachment: Attachment,
                       verdict: PartVerdict) -> AttachmentResult:
    return AttachmentResult(
        index=index, filename=attachment.filename, content_type=attachment.content_type,
        size=attachment.size, sha256=hashlib.sha256(attachment.content).hexdigest(),
        status=verdict.status, signature=verdict.signature, problem=verdict.problem)
