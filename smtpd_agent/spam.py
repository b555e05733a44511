"""Stage 5 of the pipeline: spam scoring with rspamd, between scan and store.

The pipeline calls `SpamFilter.check()` once per message at end of DATA, then
the pure `decide()` turns the `SpamResult` into a `SpamDecision`; the pipeline
maps the decision to its SMTP reply (smtp/replies.py) and stores the score,
the action and the symbols per message. This module writes no SMTP replies.

Shaped like scan.py: `post_check()` does the I/O (rspamd's HTTP protocol,
`POST /checkv2`) and returns an outcome kind (connect_failed, timeout,
http_error, done + the body); `request_headers()`, `parse_reply()`,
`classify()` and `decide()` are pure.

What rspamd is told. The message as it will be stored (our
Authentication-Results and Received headers first, so rspamd's rules see
our SPF/DKIM/DMARC verdicts) and, as protocol headers, the client IP, the
HELO name, the envelope sender, one `Rcpt` per recipient, our queue id and
our host name (`MTA-Name`), and the client's name (`Hostname`) only when the
edge's iprev confirmed it forward (rspamd reads a missing one as unresolved).

Its action decides (rspamd's names): `reject` -> reject (550 5.7.1);
`soft reject` -> tempfail (451); `add header` / `rewrite subject` -> label
(stored as spam, held from the agent: no job); `greylist` -> per
`spam.greylist`, ignored by default (an agent waiting for a one-time code
must not wait for a retry); `no action` -> accept.

Failure is open by default (`spam.required = false`): rspamd unreachable,
timing out (one deadline of `spam.timeout` per message, waiting for a free
connection included) or answering what we cannot read stores the message
as `unscored`; with `spam.required` it is 451. Connections are per message:
an rspamd that restarts is used again on the next one.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import structlog
from multidict import CIMultiDict

from .config import ConfigError, SpamSettings
from .record import InboundMessage

# rspamd's reply is a JSON object of a few KiB; a bound on what a broken or
# hostile peer can make us buffer.
MAX_REPLY = 1024 * 1024
# Concurrent checks per process; more only queue inside rspamd's workers.
DEFAULT_MAX_CONNECTIONS = 16
# Symbols stored per message (rspamd sends a few dozen); the highest scores first.
MAX_SYMBOLS = 64
HEALTH_TIMEOUT = 2.0

OutcomeKind = Literal["connect_failed", "timeout", "http_error", "done"]
Problem = Literal["connect_failed", "timeout", "http_error", "bad_reply"]
SpamStatus = Literal["scored", "unscored"]


class RspamdAction(enum.StrEnum):
    """rspamd's actions, by the names it sends (rspamd.com/doc/faq.html#what-are-actions)."""

    NO_ACTION = "no action"
    GREYLIST = "greylist"
    ADD_HEADER = "add header"
    REWRITE_SUBJECT = "rewrite subject"
    SOFT_REJECT = "soft reject"
    REJECT = "reject"


class Disposition(enum.StrEnum):
    """What becomes of the message; the pipeline owns the reply for each."""

    ACCEPT = "accept"
    LABEL = "label"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    ACCEPT_UNSCORED = "accept_unscored"


class SpamReason(enum.StrEnum):
    NOT_SPAM = "not_spam"
    SPAM = "spam"
    SOFT_REJECT = "soft_reject"
    GREYLIST = "greylist"
    FILTER_UNAVAILABLE = "filter_unavailable"


# --- I/O: outcome kinds, no interpretation -----------------------------------------------------

@dataclass(frozen=True)
class RspamdOutcome:
    """What happened on the wire; `body` is rspamd's reply when kind is `done`."""

    kind: OutcomeKind
    body: bytes | None = None
    detail: str | None = None


async def post_check(url: str, headers: CIMultiDict[str], data: bytes,
                     deadline: float) -> RspamdOutcome:
    """POST `data` to `<url>/checkv2` on a fresh connection, all before `deadline` (loop time)."""
    loop = asyncio.get_running_loop()
    remaining = max(deadline - loop.time(), 0.001)
    timeout = aiohttp.ClientTimeout(total=remaining)
    try:
        async with asyncio.timeout_at(deadline):
            connector = aiohttp.TCPConnector(force_close=True, limit=1)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                async with session.post(url.rstrip("/") + "/checkv2", data=data,
                                        headers=headers) as response:
                    body = await response.content.read(MAX_REPLY + 1)
                    if response.status != 200:
                        return RspamdOutcome("http_error", detail=f"HTTP {response.status}")
                    if len(body) > MAX_REPLY:
                        return RspamdOutcome("http_error", detail="reply too large")
                    return RspamdOutcome("done", body=body)
    except TimeoutError:
        return RspamdOutcome("timeout", detail="deadline exceeded")
    except aiohttp.ClientConnectorError as error:
        return RspamdOutcome("connect_failed", detail=_describe(error))
    except (aiohttp.ClientError, OSError) as error:
        return RspamdOutcome("http_error", detail=_describe(error))


async def ping(url: str, timeout: float) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(url.rstrip("/") + "/ping") as response:
                return response.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# --- pure: what we send, what rspamd said, and what it means -------------------------------------

# Header values go out on the wire: printable ASCII only, bounded.
_UNSAFE = re.compile(r"[^\x20-\x7e]")


def _header_value(value: str, limit: int = 998) -> str:
    return _UNSAFE.sub("", value)[:limit]


def request_headers(message: InboundMessage, hostname: str, queue_id: str) -> CIMultiDict[str]:
    """rspamd's protocol headers (docs: rspamd.com/doc/developers/protocol.html)."""
    envelope = message.envelope
    headers: CIMultiDict[str] = CIMultiDict()
    if envelope.client_ip:
        headers["IP"] = _header_value(envelope.client_ip)
    if envelope.helo:
        headers["Helo"] = _header_value(envelope.helo)
    headers["From"] = _header_value(envelope.mail_from or "")
    for recipient in envelope.recipients:
        headers.add("Rcpt", _header_value(recipient.address))
    if queue_id:
        headers["Queue-Id"] = _header_value(queue_id)
    headers["MTA-Name"] = _header_value(hostname)
    if envelope.iprev is not None and envelope.iprev.confirmed_name:
        headers["Hostname"] = _header_value(envelope.iprev.confirmed_name)
    return headers


@dataclass(frozen=True)
class RspamdReply:
    action: RspamdAction
    score: float
    required_score: float | None
    symbols: tuple[tuple[str, float], ...]
    smtp_message: str | None = None


_SYMBOL = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def parse_reply(body: bytes) -> RspamdReply | None:
    """rspamd's /checkv2 JSON; None when it is not what the protocol promises."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    try:
        action = RspamdAction(document.get("action"))
    except ValueError:
        return None
    score = _number(document.get("score"))
    if score is None:
        return None
    symbols: list[tuple[str, float]] = []
    raw_symbols = document.get("symbols")
    if isinstance(raw_symbols, Mapping):
        for name, symbol in raw_symbols.items():
            value = _number(symbol.get("score")) if isinstance(symbol, Mapping) else None
            if isinstance(name, str) and _SYMBOL.match(name) and value is not None:
                symbols.append((name, value))
    symbols.sort(key=lambda item: (-abs(item[1]), item[0]))
    messages = document.get("messages")
    smtp_message = messages.get("smtp_message") if isinstance(messages, Mapping) else None
    return RspamdReply(action=action, score=score,
                       required_score=_number(document.get("required_score")),
                       symbols=tuple(symbols[:MAX_SYMBOLS]),
                       smtp_message=_header_value(smtp_message, 200)
                       if isinstance(smtp_message, str) else None)


@dataclass(frozen=True)
class SpamResult:
    """Everything the store keeps about a check."""

    status: SpamStatus
    action: RspamdAction | None = None
    score: float | None = None
    required_score: float | None = None
    symbols: tuple[tuple[str, float], ...] = ()
    problem: Problem | None = None
    detail: str | None = None
    elapsed: float = 0.0

    def symbols_json(self) -> dict[str, float] | None:
        return dict(self.symbols) if self.status == "scored" else None


def classify(outcome: RspamdOutcome, elapsed: float = 0.0) -> SpamResult:
    """Outcome kind + body -> result; an unreachable or incoherent rspamd is `unscored`."""
    if outcome.kind != "done":
        return SpamResult("unscored", problem=outcome.kind, detail=outcome.detail,
                          elapsed=elapsed)
    reply = parse_reply(outcome.body or b"")
    if reply is None:
        return SpamResult("unscored", problem="bad_reply", detail="unreadable /checkv2 reply",
                          elapsed=elapsed)
    return SpamResult("scored", action=reply.action, score=reply.score,
                      required_score=reply.required_score, symbols=reply.symbols,
                      elapsed=elapsed)


@dataclass(frozen=True)
class SpamDecision:
    action: Disposition
    reason: SpamReason

    @property
    def labelled(self) -> bool:
        return self.action == Disposition.LABEL


_BY_ACTION: dict[RspamdAction, SpamDecision] = {
    RspamdAction.NO_ACTION: SpamDecision(Disposition.ACCEPT, SpamReason.NOT_SPAM),
    RspamdAction.ADD_HEADER: SpamDecision(Disposition.LABEL, SpamReason.SPAM),
    RspamdAction.REWRITE_SUBJECT: SpamDecision(Disposition.LABEL, SpamReason.SPAM),
    RspamdAction.SOFT_REJECT: SpamDecision(Disposition.TEMPFAIL, SpamReason.SOFT_REJECT),
    RspamdAction.REJECT: SpamDecision(Disposition.REJECT, SpamReason.SPAM),
}
_GREYLIST: dict[str, SpamDecision] = {
    "ignore": SpamDecision(Disposition.ACCEPT, SpamReason.GREYLIST),
    "label": SpamDecision(Disposition.LABEL, SpamReason.GREYLIST),
    "tempfail": SpamDecision(Disposition.TEMPFAIL, SpamReason.GREYLIST),
}


def decide(result: SpamResult | None, settings: SpamSettings) -> SpamDecision:
    """Pure: rspamd's action decides; an outage fails open unless `spam.required`."""
    if result is None:
        return SpamDecision(Disposition.ACCEPT_UNSCORED, SpamReason.NOT_SPAM)
    if result.status == "unscored" or result.action is None:
        return SpamDecision(Disposition.TEMPFAIL if settings.required
                            else Disposition.ACCEPT_UNSCORED, SpamReason.FILTER_UNAVAILABLE)
    if result.action == RspamdAction.GREYLIST:
        return _GREYLIST[settings.greylist]
    return _BY_ACTION[result.action]


# --- the stage -------------------------------------------------------------------------------

@dataclass
class SpamFilter:
    """One per pipeline, built from `spam.*` settings; holds no connection between checks."""

    settings: SpamSettings
    hostname: str
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    _slots: asyncio.Semaphore = field(init=False, repr=False)
    _log: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.settings.rspamd.startswith(("http://", "https://")):
            raise ConfigError(f"spam.rspamd: expected an http:// URL, got "
                              f"{self.settings.rspamd!r}")
        self._slots = asyncio.Semaphore(max(1, self.max_connections))
        self._log = structlog.get_logger(__name__).bind(rspamd=self.settings.rspamd)

    async def check(self, message: InboundMessage, data: bytes, queue_id: str) -> SpamResult:
        """Score `data` (the message as it will be stored) under one deadline of `spam.timeout`."""
        began = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.settings.timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            result = SpamResult("unscored", problem="timeout",
                                detail="waiting for an rspamd slot",
                                elapsed=time.monotonic() - began)
        else:
            try:
                outcome = await post_check(self.settings.rspamd,
                                           request_headers(message, self.hostname, queue_id),
                                           data, deadline)
            finally:
                self._slots.release()
            result = classify(outcome, time.monotonic() - began)
        self._log_result(result, message, queue_id)
        return result

    async def health(self, timeout: float = HEALTH_TIMEOUT) -> bool:
        return await ping(self.settings.rspamd, timeout)

    def _log_result(self, result: SpamResult, message: InboundMessage, queue_id: str) -> None:
        """Score, action and symbol names only: bodies never reach the log."""
        fields = dict(queue_id=queue_id, client_ip=message.envelope.client_ip,
                      mail_from=message.envelope.mail_from,
                      elapsed_ms=round(result.elapsed * 1000, 1))
        if result.status == "scored":
            self._log.info("spam.scored", action=str(result.action), score=result.score,
                           symbols=[name for name, _ in result.symbols[:10]], **fields)
        else:
            self._log.warning("spam.unscored", problem=result.problem, detail=result.detail,
                              **fields)
