"""The SMTP protocol layer: aiosmtpd's command parser with our own DATA and BDAT.

aiosmtpd parses commands and their parameters well; what we replace:

- DATA is read in chunks and ends only at <CR><LF>.<CR><LF>, found with
  bytes.find; <LF>.<LF>, <LF>.<CR><LF> and <CR>.<CR> are content (SMTP
  smuggling); the content step then normalizes or refuses bare LF
  (`smtp.bare_lf`), as Postfix's smtpd_forbid_bare_newline does.
- BDAT (CHUNKING, RFC 3030), which aiosmtpd lacks.
- Every reply gets an RFC 3463 enhanced code on its way out: aiosmtpd's own
  texts from the explicit table replies.BUILTIN_DETAILS.
- An unexpected exception answers 451 4.3.0 with the session id instead of
  aiosmtpd's permanent 500 naming the exception.
- Connection limits, global and per client (IPv4 address or IPv6 /64) across
  every accepting process, and a 421 on timeout (`limits`).
- Reputation at the edge (`edge`): bans and per-client rates of connections,
  messages and failed RCPTs (421 4.7.0), DNSBLs at connect (554 5.7.1), iprev.
- Hostile-client bounds: C0/DEL control characters refused in HELO/EHLO, MAIL
  and RCPT arguments; replies held for pipelining only up to HOLD_REPLIES bytes;
  a command cap per session; a per-process budget of in-flight message bytes;
  a minimum data rate.
- Per-connection and per-command cost: aiosmtpd's method tables are built
  without introspecting every attribute (AgentSMTP), and a plain
  `<local@domain>` path is read without the email package's parser (_getaddr).

What a session decides is not decided here: RCPT goes through the shared
recipient step and the message bytes through the shared content step
(ingress.py), and every decision becomes its reply in smtp/replies.py.

aiosmtpd internals this relies on (1.4.x; pyproject.toml bounds the version,
and tests/unit/test_smtp_session.py, test_smtp_address.py and test_replies.py
break when they change): SMTP.__init__ collecting `smtp_*`/`auth_*`/`handle_*`
through dir() (HOOK_PREFIXES); the overridden `_handle_client`,
`_create_envelope`, `_getaddr`, `_reset_timeout`/`_timeout_cb` (with
`_timeout_handle`, `_timeout_duration`) and `push`; the attributes `_reader`
(and its StreamReader's `_buffer`, as aiosmtpd's STARTTLS also reaches into),
`_writer`, `_tls_protocol`, `_handler_coroutine`, `command_size_limit(s)`,
`local_part_limit`; the helpers `_set_rset_state`, `_set_post_data_state`,
`check_helo_needed` and the `syntax` decorator; and the texts of its built-in
replies (replies.BUILTIN_DETAILS).
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import time
from typing import Any, AnyStr, Awaitable, Callable, Iterable

import structlog
from aiosmtpd.smtp import SMTP, Envelope as AioEnvelope, syntax

from ..config import SmtpSettings
from ..ingress import ContentVerdict, Recipients, accept_content, new_session_id
from ..metrics import Metrics
from ..pipeline import Outcome
from ..record import Envelope, Iprev, ReceivedContent
from . import replies
from .edge import Edge, EdgeAction, EdgeDecision, reply_for
from .limits import ConnectionLimits, DataBudget, Transfer
from .replies import Reply, SessionVerdict

log = structlog.get_logger("smtpd_agent.smtp")

READ_CHUNK = 65_536
TERMINATOR = b"\r\n.\r\n"
BDAT_ARGS = re.compile(r"^(\d{1,10})(?:\s+(LAST))?$", re.IGNORECASE)
# The usual MAIL FROM / RCPT TO path: "<" dot-atom "@" LDH labels ">" (RFC 5321 section 4.1.2),
# ASCII only. The email package would read a local part opening with "=?" as an RFC 2047
# encoded word, so that one is left to it.
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
PLAIN_PATH = re.compile(
    rf"<(?P<local>(?!=\?){ATEXT}+(?:\.{ATEXT}+)*)@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*>")
# C0 controls but HTAB, and DEL: NUL would make the row unstorable, a bare CR ends a header
# line inside our Received header. (CR/LF that end the line are gone before this is seen.)
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Replies to pipelined commands are held (RFC 2920) only while fewer bytes than this wait.
HOLD_REPLIES = 4096
# The replies held while more input waits: those to the commands RFC 2920 lets a client
# pipeline. Others (220 to STARTTLS above all: the handshake follows it) go out at once.
HELD_CODES = (b"250", b"251", b"252")


# The attribute prefixes SMTP.__init__ collects into its method and hook tables.
HOOK_PREFIXES = ("auth_", "smtp_", "handle_")


@functools.cache
def _class_hook_names(cls: type) -> frozenset[str]:
    """Once per class: a hook added to a class after its first session would go unseen."""
    return frozenset(name for name in dir(cls) if name.startswith(HOOK_PREFIXES))


def _hook_dir(obj: object) -> list[str]:
    """dir(obj) less the names SMTP.__init__ would skip: the class's names are looked up once."""
    names = _class_hook_names(type(obj))
    own = [name for name in getattr(obj, "__dict__", ()) if name.startswith(HOOK_PREFIXES)]
    return list(names.union(own)) if own else list(names)


class _HookView:
    """A handler as SMTP.__init__ sees it: the same attributes, but dir() only its hooks.

    Used only for handlers with the default dir(); one with its own __dir__ is passed as is.
    """

    __slots__ = ("handler",)

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    def __dir__(self) -> list[str]:
        return _hook_dir(self.handler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handler, name)


class TransactionEnvelope(AioEnvelope):
    """aiosmtpd's envelope plus where each recipient routes and the BDAT state."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted = Recipients.empty()
        self.bdat_chunks: list[bytes] = []
        self.bdat_size = 0
        self.bdat_failed: Reply | None = None


Deliver = Callable[[ReceivedContent], Awaitable[Reply]]


def delivering(process: Callable[[ReceivedContent], Awaitable[Outcome]],
               metrics: Metrics | None) -> Deliver:
    """What a session hands its message to: the pipeline, its verdict made a reply."""
    async def deliver(content: ReceivedContent) -> Reply:
        outcome = await process(content)
        envelope = content.envelope
        return replies.answer(outcome.verdict, "smtp", metrics, queue_id=envelope.queue_id,
                              session_id=envelope.session_id, signature=outcome.signature)
    return deliver


class Sessions:
    """The open sessions of one listener, so that stopping can drain them."""

    def __init__(self) -> None:
        self.active: set[AgentSMTP] = set()
        self.draining = False

    async def drain(self, grace: float) -> None:
        """Close idle sessions now with 421; give sessions inside DATA/BDAT `grace` seconds."""
        self.draining = True
        for session in list(self.active):
            if not session.receiving:
                session.close_with(replies.SHUTTING_DOWN)
        deadline = time.monotonic() + grace
        while any(s.receiving for s in self.active) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.active):
            session.close_with(replies.SHUTTING_DOWN)
        tasks = [s._handler_coroutine for s in self.active if s._handler_coroutine]
        if tasks:
            await asyncio.wait(tasks, timeout=5)


class AgentSMTP(SMTP):
    """One SMTP session.

    aiosmtpd's SMTP.__init__ builds its tables of smtp_*, auth_* and handle_*
    methods with inspect.getmembers() and dir() of the session and the handler,
    every connection: most of what building a session costs. While it runs,
    dir() of both is narrowed to the names with those prefixes (looked up once
    per class), so aiosmtpd's own code builds the same tables from a few names.
    tests/unit/test_smtp_session.py compares them with what aiosmtpd builds alone.
    """

    def __init__(self, handler: Any, *, settings: SmtpSettings, limits: ConnectionLimits,
                 deliver: Deliver, hostname: str, sessions: Sessions,
                 tls_context: ssl.SSLContext | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 metrics: Metrics | None = None,
                 data_budget: DataBudget | None = None,
                 edge: Edge | None = None) -> None:
        view = _HookView(handler) if type(handler).__dir__ is object.__dir__ else handler
        self._hooks_only_dir = True
        try:
            super().__init__(
                view,
                data_size_limit=settings.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=hostname,
                ident="smtpd-agent ESMTP",
                tls_context=tls_context,
                require_starttls=settings.require_starttls,
                timeout=settings.command_timeout,
                auth_require_tls=True,
                loop=loop,
            )
        finally:
            del self._hooks_only_dir
        self.event_handler = handler
        self.settings = settings
        self.limits = limits
        self.deliver = deliver
        self.session_id = new_session_id()
        self.sessions = sessions
        self.metrics = metrics
        self.receiving = False
        self._pending_replies = bytearray()
        self._greeted = False
        self._deadline = 0.0
        self.client_ip = ""
        self.transactions = 0
        self.started = time.monotonic()
        self.data_budget = data_budget
        self._replies = 0
        self.transfer = Transfer(settings, self.loop, data_budget, self._data_too_slow,
                                 reserve_step=READ_CHUNK * 4)
        self.edge = edge
        self._iprev: asyncio.Task[Iprev] | None = None
        self.dnsbl: tuple[str, ...] = ()  # zones listing the client (dnsbl_action "mark")
        self._last_code = b""  # of the last reply queued: tells a refused RCPT's kind

    def __dir__(self) -> Iterable[str]:
        if self.__dict__.get("_hooks_only_dir"):
            # Nothing has set a hook on this instance yet: the class's names are all there is.
            return list(_class_hook_names(type(self)))
        return super().__dir__()

    # -- session lifecycle -------------------------------------------------------------

    def _create_envelope(self) -> TransactionEnvelope:
        return TransactionEnvelope()

    async def _handle_client(self) -> None:
        peer = self.session.peer if self.session else None
        self.client_ip = peer[0] if isinstance(peer, tuple) else str(peer or "")
        structlog.contextvars.bind_contextvars(session=self.session_id, client_ip=self.client_ip)
        edge = self.edge
        if edge is not None and self.client_ip:
            decision = edge.connection(self.client_ip)
            if decision.action is not EdgeAction.ACCEPT:
                await self._edge_refused(decision, "connect")
                return
        if not self.limits.acquire(self.client_ip):
            log.warning("smtp.connection_refused", reason="connection limit",
                        open_total=self.limits.open_total)
            await self.push(str(replies.TOO_MANY_CONNECTIONS))
            self.transport.close()
            return
        log.debug("smtp.session_start")
        self.sessions.active.add(self)
        try:
            if edge is not None and self.client_ip:
                self._iprev = edge.start_iprev(self.client_ip)
                decision = await edge.screen(self.client_ip)
                if decision.action is not EdgeAction.ACCEPT:
                    await self._edge_refused(decision, "connect")
                    return
                self.dnsbl = decision.listed
            await super()._handle_client()
        finally:
            if self._iprev is not None and not self._iprev.done():
                self._iprev.cancel()
            self.sessions.active.discard(self)
            self.limits.release(self.client_ip)
            self.transfer.end()
            log.info("smtp.session_end", transactions=self.transactions,
                     seconds=round(time.monotonic() - self.started, 3))

    async def _edge_refused(self, decision: EdgeDecision, stage: str) -> None:
        """Answer an edge decision (in place of the greeting at connect) and close.

        At connect the 554 or 421 stands for the greeting (RFC 5321 section 3.1) and the
        connection is closed at once rather than waiting for QUIT: nothing the client
        could send would change the answer, and it holds no resources while refused.
        """
        reply = reply_for(decision)
        assert reply is not None
        if self.metrics is not None:
            self.metrics.rejected_reply("smtp", stage, decision.action.value, reply.code)
        if stage == "connect":
            self.transport.write(str(reply).encode() + b"\r\n")
            self.transport.close()
        else:
            self.close_with(reply)

    async def _iprev_result(self) -> Iprev | None:
        """The connection's iprev, awaited by the first message (it began at connect)."""
        task = self._iprev
        if task is None:
            return None
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                return None
            raise

    def close_with(self, reply: Reply) -> None:
        """Write what is held and `reply`, close; input still buffered is not read."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes(self._pending_replies) + str(reply).encode() + b"\r\n")
            self._pending_replies.clear()
            self._reader._buffer.clear()  # type: ignore[attr-defined]
            self.transport.close()

    def _set_post_data_state(self) -> None:
        """Also on RSET and EHLO (aiosmtpd's _set_rset_state): a transaction abandoned
        between BDAT chunks stops counting as receiving, for the data rate and a drain."""
        if "transfer" in self.__dict__:
            self.transfer.end()
            self.receiving = False
        super()._set_post_data_state()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timeout without a new timer per command.

        aiosmtpd cancels and re-creates a TimerHandle on every command and every
        DATA read; here the deadline moves and the pending timer stays, re-armed
        only when it fires early (_timeout_due) or when the new deadline is sooner.
        """
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._timeout_due)

    def _timeout_due(self) -> None:
        if self.loop.time() < self._deadline:  # activity since the timer was set
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        log.info("smtp.timeout")
        self.close_with(replies.TIMEOUT)
        super()._timeout_cb()

    async def push(self, status: AnyStr) -> None:
        """Queue a reply; send once the client's pipelined commands are all answered.

        RFC 2920 lets a server hold replies while more commands are waiting in
        its input buffer (Postfix does); one write per pipelined group instead
        of one per command saves a syscall and a wake-up of the client each.
        Only 250/251/252 wait, and only up to HOLD_REPLIES bytes: aiosmtpd closes
        the connection only after a negative reply or 221, so nothing held back
        is lost to a close, and a client that keeps input waiting (writes that
        end mid-line) still gets its replies, and its writes throttled by ours.
        """
        if self.transport is None or self.transport.is_closing():
            return
        line = status.encode("utf-8") if isinstance(status, str) else status
        if not self._greeted and line[:3] == b"220":
            self._greeted = True  # RFC 2034 section 3: the greeting carries no enhanced code
        else:
            line = replies.enhance(line)
            if not self._count_reply():
                return
        self._last_code = line[:3]
        self._pending_replies += line + b"\r\n"
        if (self._reader._buffer and line[:3] in HELD_CODES  # type: ignore[attr-defined]
                and len(self._pending_replies) < HOLD_REPLIES):
            return
        await self.flush_replies()

    def _count_reply(self) -> bool:
        """Count one more command answered; past smtp.max_commands, 421 and close."""
        self._replies += 1
        if self._replies <= self.settings.max_commands:
            return True
        log.warning("smtp.command_limit", commands=self._replies - 1)
        self.close_with(replies.TOO_MANY_COMMANDS)
        return False

    async def flush_replies(self) -> None:
        if self._pending_replies:
            self._writer.write(bytes(self._pending_replies))
            self._pending_replies.clear()
            await self._writer.drain()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's, with the plain `<local@domain>` read by one regex.

        aiosmtpd parses every address with email._header_value_parser (~35 us
        each); for a dot-atom local part and a plain domain the answer is the
        text between the brackets. Anything else still goes to aiosmtpd.
        tests/unit/test_smtp_address.py checks the two agree.
        """
        match = PLAIN_PATH.match(arg)
        if match is None:
            return super()._getaddr(arg)
        rest = arg[match.end():]
        if rest[:1] in (" ", "\t"):
            rest = rest.lstrip()  # as get_angle_addr's trailing CFWS: all whitespace
        if rest[:1] == "(":
            return super()._getaddr(arg)  # a comment
        if self.local_part_limit and len(match["local"]) > self.local_part_limit:
            return None, None
        return match[0][1:-1], rest

    async def handle_exception(self, error: Exception) -> str:
        log.exception("smtp.internal_error", error=type(error).__name__)
        return str(replies.TEMP_ERROR.for_session(self.session_id))

    # -- commands ----------------------------------------------------------------------

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push(str(replies.SYNTAX_ERROR.with_text("Syntax: EHLO hostname")))
            return
        if CONTROL.search(hostname):
            await self.push(str(self._control_refused(
                "ehlo", SessionVerdict.HELO_CONTROL_CHARACTER)))
            return
        if not self._count_reply():
            return
        self._set_rset_state()
        self.session.extended_smtp = True
        self.session.host_name = hostname
        self.command_size_limits["MAIL"] = self.command_size_limit + 26 + 10
        self._pending_replies += replies.ehlo(
            self.hostname, self.data_size_limit, bool(self.tls_context and not self._tls_protocol))
        await self.flush_replies()

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not hostname:
            await self.push(str(replies.SYNTAX_ERROR.with_text("Syntax: HELO hostname")))
            return
        if CONTROL.search(hostname):
            await self.push(str(self._control_refused(
                "helo", SessionVerdict.HELO_CONTROL_CHARACTER)))
            return
        if not self._count_reply():
            return
        self._set_rset_state()
        self.session.extended_smtp = False
        self.session.host_name = hostname
        self._pending_replies += replies.helo(self.hostname)
        await self.flush_replies()

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg and CONTROL.search(arg):
            await self.push(str(self._control_refused(
                "mail", SessionVerdict.SENDER_CONTROL_CHARACTER)))
            return
        if self.edge is not None and self.client_ip:
            decision = self.edge.message(self.client_ip)
            if decision.action is not EdgeAction.ACCEPT:
                await self._edge_refused(decision, "mail")
                return
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        accepted = len(self.envelope.rcpt_tos)
        if arg and CONTROL.search(arg):
            await self.push(str(self._control_refused("rcpt",
                                                      SessionVerdict.RECIPIENT_CONTROL_CHARACTER)))
        else:
            await super().smtp_RCPT(arg)
        # A dictionary attack's unit: an RCPT refused for good (unknown mailbox, relay
        # denied, syntax). A 4xx (too many recipients, a database outage) is not the
        # client's doing and never counts.
        if (self.edge is not None and self.client_ip and self.envelope is not None
                and len(self.envelope.rcpt_tos) == accepted and self._last_code[:1] == b"5"):
            decision = self.edge.failed_rcpt(self.client_ip)
            if decision.action is not EdgeAction.ACCEPT:
                await self._edge_refused(decision, "rcpt")

    def _control_refused(self, command: str, verdict: SessionVerdict) -> Reply:
        """Log (without the argument: it is what carries the control character); the reply
        and its count from the table."""
        log.info("smtp.command_rejected", command=command, reason="control character")
        return replies.answer(verdict, "smtp", self.metrics, stage=command)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if arg:
            await self.push(str(replies.SYNTAX_ERROR.with_text("Syntax: DATA")))
            return
        if not self.envelope.rcpt_tos:
            await self.push(str(replies.BAD_SEQUENCE.with_text("Need RCPT command")))
            return
        if self.envelope.bdat_chunks or self.envelope.bdat_size:
            await self.push(str(replies.BAD_SEQUENCE.with_text("DATA not allowed after BDAT")))
            return
        await self.push(replies.START_MAIL_INPUT)
        self.receiving = True
        self.transfer.start_rate_watch()
        try:
            data, too_big, over_budget = await self._read_dot_terminated()
            self.transfer.stop_rate_watch()
            self._reset_timeout()
            if over_budget and not too_big:
                await self.push(str(self._over_budget()))
                return
            await self.push(str(await self._finish(data, too_big, dot_stuffed=True)))
        finally:
            self._set_post_data_state()
            self._end_receiving()

    @syntax("BDAT size [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        match = BDAT_ARGS.match((arg or "").strip())
        if match is None:
            # The chunk size is unknown, so the stream cannot be resynchronised.
            await self.push(str(replies.SYNTAX_ERROR.with_text("Syntax: BDAT size [LAST]")))
            self.transport.close()
            return
        size, last = int(match.group(1)), match.group(2) is not None
        envelope: TransactionEnvelope = self.envelope
        limit = self.settings.max_message_size
        self.receiving = True
        self.transfer.start_rate_watch()
        try:
            await self._bdat_chunk(envelope, size, last, limit)
        finally:
            if last or not envelope.rcpt_tos:
                self._end_receiving()

    def _end_receiving(self) -> None:
        self.receiving = False
        self.transfer.stop_rate_watch()
        if self.sessions.draining:
            self.close_with(replies.SHUTTING_DOWN)

    # -- budgets: in-flight bytes and minimum data rate ---------------------------------

    def _over_budget(self) -> Reply:
        self.transactions += 1
        log.warning("smtp.rejected", reason="data budget exhausted",
                    budget=self.data_budget.limit if self.data_budget else None)
        return replies.answer(SessionVerdict.DATA_BUDGET_EXHAUSTED, "smtp", self.metrics)

    def _data_too_slow(self, rate: float) -> None:
        log.info("smtp.data_too_slow", bytes_per_second=round(rate, 1),
                 minimum=self.settings.min_data_rate)
        self.close_with(replies.answer(SessionVerdict.DATA_TOO_SLOW, "smtp", self.metrics))

    async def _bdat_chunk(self, envelope: TransactionEnvelope, size: int, last: bool,
                          limit: int) -> None:
        keep = bool(not envelope.bdat_failed and envelope.rcpt_tos
                    and envelope.bdat_size + size <= limit)
        if keep and not self.transfer.hold(envelope.bdat_size + size):
            keep = False
            envelope.bdat_failed = replies.DATA_BUDGET_EXHAUSTED
            envelope.bdat_chunks.clear()
        chunk = await self._read_exactly(size, keep=keep)
        if last:
            self.transfer.stop_rate_watch()
        self._reset_timeout()
        if not self.session.host_name:
            await self.push(str(replies.BAD_SEQUENCE.with_text("Send EHLO first")))
            return
        if not envelope.rcpt_tos:
            await self.push(str(replies.BAD_SEQUENCE.with_text("Need RCPT command")))
            return
        envelope.bdat_size += size
        if envelope.bdat_failed is None and envelope.bdat_size > limit:
            envelope.bdat_failed = replies.reply_for(ContentVerdict.TOO_BIG)
        if envelope.bdat_failed is None:
            envelope.bdat_chunks.append(chunk)
        if not last:
            await self.push(str(envelope.bdat_failed or replies.bdat_chunk_ok(size)))
            return
        try:
            if envelope.bdat_failed is replies.DATA_BUDGET_EXHAUSTED:
                await self.push(str(self._over_budget()))
                return
            data = b"".join(envelope.bdat_chunks)
            envelope.bdat_chunks.clear()
            await self.push(str(await self._finish(data, too_big=envelope.bdat_failed is not None,
                                                   dot_stuffed=False)))
        finally:
            self._set_post_data_state()

    # -- reading message content -------------------------------------------------------

    async def _read_dot_terminated(self) -> tuple[bytes, bool, bool]:
        """Read up to <CR><LF>.<CR><LF>; return the content (still dot-stuffed), whether it
        was too big, and whether it outgrew the data budget (neither is kept, but read to
        its end).

        The CRLF that ended the DATA command line opens the buffer, so an empty
        message (".<CR><LF>" straight away) is found by the same search.
        """
        reader = self._reader
        buffer = bytearray(b"\r\n")
        limit = self.settings.max_message_size + 2
        too_big = over_budget = False
        search_from = 0
        while True:
            end = buffer.find(TERMINATOR, search_from)
            if end >= 0:
                break
            if len(buffer) > limit:
                too_big = True
            elif not over_budget and not self.transfer.hold(len(buffer)):
                over_budget = True
                log.info("smtp.data_budget_exhausted", size=len(buffer))
            if too_big or over_budget:
                del buffer[2:-4]
                self.transfer.release()
            search_from = max(0, len(buffer) - len(TERMINATOR) + 1)
            self._reset_timeout(self.settings.data_timeout)
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                raise ConnectionResetError("connection closed in DATA")
            self.transfer.window_bytes += len(chunk)
            buffer += chunk
        leftover = buffer[end + len(TERMINATOR):]
        if leftover:
            # Pipelined commands after the final dot belong to the command loop. aiosmtpd
            # itself reaches into the reader's buffer for STARTTLS; we put them back in front.
            reader._buffer[0:0] = leftover  # type: ignore[attr-defined]
        if too_big or end > limit:
            return b"", True, over_budget
        if over_budget:
            return b"", False, True
        with memoryview(buffer) as view:
            return bytes(view[2:end + 2]), False, False

    async def _read_exactly(self, size: int, keep: bool) -> bytes:
        """Read a BDAT chunk in pieces (each counts for the data rate); when it will be
        refused anyway, drain it without keeping it."""
        pieces: list[bytes] = []
        remaining = size
        while remaining:
            self._reset_timeout(self.settings.data_timeout)
            piece = await self._reader.read(min(remaining, READ_CHUNK))
            if not piece:
                raise asyncio.IncompleteReadError(b"".join(pieces), size)
            remaining -= len(piece)
            self.transfer.window_bytes += len(piece)
            if keep:
                pieces.append(piece)
        return b"".join(pieces) if len(pieces) != 1 else pieces[0]

    async def _finish(self, data: bytes, too_big: bool, dot_stuffed: bool) -> Reply:
        """The shared content step (ingress.py), then the pipeline; the reply from the table."""
        self.transactions += 1
        envelope: TransactionEnvelope = self.envelope
        ssl_object = self.transport.get_extra_info("ssl_object") if self._tls_protocol else None
        record = Envelope(
            session_id=self.session_id,
            queue_id=f"{self.session_id}.{self.transactions}",
            client_ip=self.client_ip,
            helo=self.session.host_name or "",
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from or "",
            recipients=tuple(envelope.accepted.mailboxes),
            tls=self._tls_protocol is not None,
            tls_version=ssl_object.version() if ssl_object else None,
            smtputf8=envelope.smtp_utf8,
            esmtp=self.session.extended_smtp,
            bounce_tokens=tuple(envelope.accepted.bounce_tokens),
            iprev=await self._iprev_result(),
            dnsbl=self.dnsbl,
        )
        decision = accept_content(record, data, self.settings, self.hostname, too_big=too_big,
                                  dot_stuffed=dot_stuffed)
        if decision.content is None:
            return replies.answer(decision.verdict, "smtp", self.metrics)
        return await self.deliver(decision.content)
