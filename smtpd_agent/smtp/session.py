"""The native SMTP session (`smtp.session = "native"`): one asyncio.Protocol per connection
that parses commands, pipelined groups, DATA and BDAT straight from its buffer.

aiosmtpd (smtp/server.py) runs a task per connection that awaits a StreamReader line
by line and drains the writer after every reply. Here `data_received` appends to a
buffer and answers every complete command it holds at once; only a step that has to
wait (a recipient lookup, the pipeline at the end of a message, the TLS handshake,
DNSBLs at connect) runs as a task, and the buffer is read on when
it ends. Replies to a pipelined group are written once, at its end (RFC 2920).

The dialogue is aiosmtpd's, reply for reply: the same command parser (lines end at
<LF>; the same line, command and parameter limits; the same texts, given their
enhanced codes by replies.enhance), and the same DATA/BDAT reading as AgentSMTP
(content ends only at <CR><LF>.<CR><LF>; the content step in ingress.py unstuffs and
settles bare LF). tests/integration/test_session_differential.py feeds the same raw
dialogues to both and compares the replies. Where the two differ on purpose:

- End of input (the client half-closes): commands already received are answered
  before the connection closes; aiosmtpd cancels whatever it is doing.
- STARTTLS inside TLS: 554 5.5.1 here; aiosmtpd starts a second handshake.
- AUTH inside TLS: 504 5.5.4 (no mechanism is offered); aiosmtpd runs its
  always-failing LOGIN/PLAIN exchange.
- `MAIL ... SIZE=` with non-ASCII digits: a syntax error here; aiosmtpd raises
  inside int() and answers 451 4.3.0.

Backpressure: reading pauses while unanswered input exceeds MAX_PENDING_INPUT bytes
or while the client does not read our replies (the transport's write buffer is full).
"""

from __future__ import annotations

import asyncio
import contextvars
import ssl
import time
from collections.abc import Coroutine
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from enum import Enum
from typing import Any, Callable

import structlog

from ..config import SmtpSettings
from ..ingress import ContentVerdict, Recipients, accept_content, new_session_id
from ..metrics import Metrics
from ..record import Envelope, Iprev
from . import replies
from .edge import Edge, EdgeAction, EdgeDecision, reply_for
from .handler import SessionHandler
from .limits import ConnectionLimits, DataBudget, Transfer
from .replies import Reply, SessionVerdict
from .server import (BDAT_ARGS, CONTROL, HELD_CODES, HOLD_REPLIES, PLAIN_PATH, READ_CHUNK,
                     TERMINATOR, Deliver, Sessions)

log = structlog.get_logger("smtpd_agent.smtp")

# RFC 5321 section 4.5.3.1.6 (1000 octets with CRLF, plus a transparent dot) as
# aiosmtpd's StreamReader limit: a line longer than this is dropped as it arrives.
LINE_LIMIT = 1001
COMMAND_LIMIT = 512  # section 4.5.3.1.4
MAIL_LIMIT = COMMAND_LIMIT + 26 + 10  # with SIZE= and SMTPUTF8 (RFC 1870, RFC 6531)
BOGUS_LIMIT = 5  # unknown commands; the fifth ends the session (as aiosmtpd)
ALLOWED_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})
# Unanswered input held while a step waits, before reading pauses.
MAX_PENDING_INPUT = 4 * READ_CHUNK
# HELP's texts (aiosmtpd's @syntax), extended ones after EHLO.
SYNTAX = {
    "AUTH": ("AUTH <mechanism>", ""), "BDAT": ("BDAT size [LAST]", ""), "DATA": ("DATA", ""),
    "EHLO": ("EHLO hostname", ""), "HELO": ("HELO hostname", ""),
    "HELP": ("HELP [command]", ""),
    "MAIL": ("MAIL FROM: <address>", " [SP <mail-parameters>]"),
    "NOOP": ("NOOP [ignored]", ""), "QUIT": ("QUIT", ""),
    "RCPT": ("RCPT TO: <address>", " [SP <mail-parameters>]"), "RSET": ("RSET", ""),
    "STARTTLS": ("STARTTLS", ""), "VRFY": ("VRFY <address>", ""),
}
TLS_ACTIVE = Reply(554, "5.1", "TLS already active")
NO_AUTH_MECHANISM = Reply(504, "5.4", "Unrecognized authentication type")


def parse_path(arg: str) -> tuple[str | None, str | None]:
    """(address, the rest) of a MAIL FROM / RCPT TO argument; (None, None) if malformed.

    AgentSMTP._getaddr's answer: the plain `<local@domain>` by one regex, anything
    else by the email package's parser as aiosmtpd reads it ("<>" stays "<>").
    """
    match = PLAIN_PATH.match(arg)
    if match is not None:
        rest = arg[match.end():]
        if rest[:1] in (" ", "\t"):
            rest = rest.lstrip()
        if rest[:1] != "(":
            return match[0][1:-1], rest
    if not arg:
        return "", ""
    try:
        if arg.lstrip().startswith("<"):
            address, rest = get_angle_addr(arg)
        else:
            address, rest = get_addr_spec(arg)
    except HeaderParseError:
        return None, None
    return address.addr_spec, rest


def parse_params(params: list[str]) -> dict[str, str | bool] | None:
    """ESMTP parameters (RFC 1869), or None if one is malformed."""
    result: dict[str, str | bool] = {}
    for param in params:
        name, eq, value = param.partition("=")
        if not name.isalnum() or eq and not value:
            return None
        result[name] = value if eq else True
    return result


class Mode(Enum):
    CONNECTING = "connecting"  # the connect-time checks have not answered yet
    COMMAND = "command"
    DATA = "data"
    BDAT = "bdat"
    HANDSHAKE = "handshake"  # STARTTLS: input waits for the handshake to end
    CLOSED = "closed"


class Transaction:
    """One mail transaction: what SessionHandler's MAIL and RCPT hooks fill in, and BDAT."""

    __slots__ = ("mail_from", "mail_options", "rcpt_tos", "rcpt_options", "accepted",
                 "smtp_utf8", "bdat_chunks", "bdat_size", "bdat_failed")

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []
        self.accepted = Recipients.empty()
        self.smtp_utf8 = False
        self.bdat_chunks: list[bytes] = []
        self.bdat_size = 0
        self.bdat_failed: Reply | None = None


class NativeSession(asyncio.Protocol):
    """One SMTP session, parsed from the buffer (see the module docstring)."""

    def __init__(self, handler: SessionHandler, *, settings: SmtpSettings,
                 limits: ConnectionLimits, deliver: Deliver, hostname: str, sessions: Sessions,
                 tls_context: ssl.SSLContext | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 metrics: Metrics | None = None, data_budget: DataBudget | None = None,
                 edge: Edge | None = None) -> None:
        self.handler = handler
        self.settings = settings
        self.limits = limits
        self.deliver = deliver
        self.hostname = hostname
        self.sessions = sessions
        self.tls_context = tls_context
        self.loop = loop or asyncio.get_event_loop()
        self.metrics = metrics
        self.data_budget = data_budget
        self.edge = edge
        self.session_id = new_session_id()
        self.data_size_limit = settings.max_message_size
        self.require_starttls = bool(tls_context and settings.require_starttls)
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.host_name: str | None = None
        self.extended_smtp = False
        self.tls = False
        self.envelope = Transaction()
        self.receiving = False
        self.transactions = 0
        self.started = time.monotonic()
        self.dnsbl: tuple[str, ...] = ()
        # Resolved when the connection is gone (Sessions.drain waits on it).
        self._handler_coroutine: asyncio.Future[None] = self.loop.create_future()
        self._mode = Mode.CONNECTING
        self._buffer = bytearray()
        self._out = bytearray()
        self._greeted = False
        self._replies = 0
        self._bogus = BOGUS_LIMIT
        self._last_code = b""
        self._discarding = False  # inside a command line longer than LINE_LIMIT
        self._eof = False
        self._busy: asyncio.Task[Any] | None = None  # the step being waited for
        self._processing = False
        self._read_paused = False
        self._write_paused = False
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._context = contextvars.copy_context()
        self._iprev: asyncio.Task[Iprev] | None = None
        self._acquired = False
        # DATA and BDAT
        self._data = bytearray()
        self._search_from = 0
        self._too_big = False
        self._over_budget = False
        self._bdat_left = 0
        self._bdat_keep = False
        self._bdat_pieces: list[bytes] = []
        self._bdat_last = False
        self._bdat_size = 0
        self.transfer = Transfer(settings, self.loop, data_budget, self._data_too_slow,
                                 self._context, reserve_step=READ_CHUNK * 4)

    # -- transport callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else str(peer or "")
        self._enter(self._connected)

    def data_received(self, data: bytes) -> None:
        if self._mode is Mode.CLOSED:
            return
        if self._discarding and self._mode is Mode.COMMAND and not self._buffer:
            newline = data.find(b"\n")
            if newline < 0:
                return  # the rest of an overlong line: never kept
            data = data[newline:]
        self._buffer += data
        if self._mode in (Mode.DATA, Mode.BDAT) or (
                self._busy is None and self._mode is Mode.COMMAND):
            self._enter(self._process)
        elif len(self._buffer) > MAX_PENDING_INPUT:
            self._pause()

    def eof_received(self) -> bool | None:
        """Answer what was received, then close (a half-closed client still reads)."""
        if (self._mode in (Mode.COMMAND, Mode.CONNECTING) and not self.tls
                and not self._closing()):
            self._eof = True
            if self._busy is None and self._mode is Mode.COMMAND:
                self._enter(self._process)
            return True
        return False

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        """The client reads its replies again: answer what waited for that."""
        self._write_paused = False
        if self._busy is None and not self._processing and self._mode in (
                Mode.COMMAND, Mode.DATA, Mode.BDAT):
            self._enter(self._process)
        else:
            self._maybe_resume()

    def _enter(self, function: Callable[[], None]) -> None:
        """Run `function` in this connection's context (its log fields); a TLS transport
        may call back while that context is already entered."""
        try:
            self._context.run(function)
        except RuntimeError as error:
            if "cannot enter context" not in str(error):
                raise
            function()

    def connection_lost(self, error: Exception | None) -> None:
        self._mode = Mode.CLOSED
        self._enter(self._cleanup)

    # -- life of a session ---------------------------------------------------------------

    def _connected(self) -> None:
        structlog.contextvars.bind_contextvars(session=self.session_id, client_ip=self.client_ip)
        self._reset_timeout()
        edge = self.edge
        if edge is not None and self.client_ip:
            decision = edge.connection(self.client_ip)
            if decision.action is not EdgeAction.ACCEPT:
                self._edge_refused(decision, "connect")
                return
        if not self.limits.acquire(self.client_ip):
            log.warning("smtp.connection_refused", reason="connection limit",
                        open_total=self.limits.open_total)
            self._send_now(str(replies.TOO_MANY_CONNECTIONS).encode() + b"\r\n")
            self._close()
            return
        self._acquired = True
        log.debug("smtp.session_start")
        self.sessions.active.add(self)  # type: ignore[arg-type]
        if edge is not None and self.client_ip:
            self._iprev = edge.start_iprev(self.client_ip)
            if edge.settings.dnsbl:
                self._run(edge.screen(self.client_ip), self._screened)
                return
        self._greet()

    def _screened(self, decision: EdgeDecision) -> None:
        if decision.action is not EdgeAction.ACCEPT:
            self._edge_refused(decision, "connect")
            return
        self.dnsbl = decision.listed
        self._greet()

    def _greet(self) -> None:
        self._mode = Mode.COMMAND
        self._push(f"220 {self.hostname} smtpd-agent ESMTP")
        self._process()

    def _cleanup(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._busy is not None:
            self._busy.cancel()
            self._busy = None
        if self._iprev is not None and not self._iprev.done():
            self._iprev.cancel()
        self.transfer.end()
        if self._acquired:
            self._acquired = False
            self.sessions.active.discard(self)  # type: ignore[arg-type]
            self.limits.release(self.client_ip)
            log.info("smtp.session_end", transactions=self.transactions,
                     seconds=round(time.monotonic() - self.started, 3))
        self._buffer.clear()
        self._data = bytearray()
        if not self._handler_coroutine.done():
            self._handler_coroutine.set_result(None)

    def _closing(self) -> bool:
        return self.transport is None or self.transport.is_closing() or self._mode is Mode.CLOSED

    def _close(self) -> None:
        """Close after writing what is held; input not yet read is not read."""
        self._flush()
        self._mode = Mode.CLOSED
        self._buffer.clear()
        if self.transport is not None:
            self.transport.close()

    def close_with(self, reply: Reply) -> None:
        """Write what is held and `reply`, close (Sessions.drain, timeouts, limits)."""
        if not self._closing():
            self._out += str(reply).encode() + b"\r\n"
            self._close()

    def _edge_refused(self, decision: EdgeDecision, stage: str) -> None:
        """An edge decision's reply (at connect: in place of the greeting), then close."""
        reply = reply_for(decision)
        assert reply is not None
        if self.metrics is not None:
            self.metrics.rejected_reply("smtp", stage, decision.action.value, reply.code)
        if stage == "connect":
            self._send_now(str(reply).encode() + b"\r\n")
            self._mode = Mode.CLOSED
            if self.transport is not None:
                self.transport.close()
        else:
            self.close_with(reply)

    # -- timeouts ------------------------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the deadline; the one timer is re-armed only when it fires early."""
        deadline = self.loop.time() + (duration or self.settings.command_timeout)
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.cancelled() or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._timeout_due, context=self._context)

    def _timeout_due(self) -> None:
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._timeout_due,
                                            context=self._context)
            return
        self._timer = None
        if self._closing():
            return
        log.info("smtp.timeout")
        self.close_with(replies.TIMEOUT)

    # -- replies -------------------------------------------------------------------------

    def _send_now(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _push(self, status: str | bytes) -> None:
        """Queue a reply (enhanced code added, counted against smtp.max_commands); held
        while more pipelined input waits, as AgentSMTP.push."""
        if self._closing():
            return
        line = status.encode("utf-8") if isinstance(status, str) else status
        if not self._greeted and line[:3] == b"220":
            self._greeted = True
        else:
            line = replies.enhance(line)
            if not self._count_reply():
                return
        self._last_code = line[:3]
        self._out += line + b"\r\n"
        if self._buffer and line[:3] in HELD_CODES and len(self._out) < HOLD_REPLIES:
            return
        self._flush()

    def _count_reply(self) -> bool:
        self._replies += 1
        if self._replies <= self.settings.max_commands:
            return True
        log.warning("smtp.command_limit", commands=self._replies - 1)
        self.close_with(replies.TOO_MANY_COMMANDS)
        return False

    def _flush(self) -> None:
        if self._out:
            self._send_now(bytes(self._out))
            self._out.clear()

    # -- reading: backpressure and steps that wait ----------------------------------------

    def _pause(self) -> None:
        if (not self._read_paused and self.transport is not None and not self._closing()
                and self._mode is not Mode.HANDSHAKE):
            self._read_paused = True
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        if (self._read_paused and not self._write_paused and self.transport is not None
                and not self._closing() and len(self._buffer) <= MAX_PENDING_INPUT
                and self._mode is not Mode.HANDSHAKE):
            self._read_paused = False
            self.transport.resume_reading()

    def _run(self, step: Coroutine[Any, Any, Any], then: Callable[[Any], None],
             eager: bool = False) -> None:
        """Run `step`; `then(result)` once it is done, then read on.

        `eager`: start it here and now, outside a task, so that a step that needs no
        waiting (MAIL's hook) costs no task, and one that must begin at once does (the
        TLS handshake takes the transport before anything more is read). Only for steps
        that never use what needs the current task (asyncio.timeout does).
        """
        if eager:
            try:
                waiting = step.send(None)
            except StopIteration as stop:
                then(stop.value)
                return
            except Exception as error:
                self._internal_error(error)
                return
            self._busy = self.loop.create_task(_resume(step, waiting), context=self._context)
        else:
            self._busy = self.loop.create_task(step, context=self._context)
        self._busy.add_done_callback(lambda task: self._step_done(task, then),
                                     context=self._context)

    def _step_done(self, task: asyncio.Task[Any], then: Callable[[Any], None]) -> None:
        if task is not self._busy:
            return
        self._busy = None
        if task.cancelled() or self._mode is Mode.CLOSED:
            return
        error = task.exception()
        if error is not None:
            self._internal_error(error)
        else:
            then(task.result())
        if self._busy is None:
            self._process()

    def _internal_error(self, error: BaseException) -> None:
        log.error("smtp.internal_error", error=type(error).__name__, exc_info=error)
        if self._mode is Mode.HANDSHAKE:
            self._close()
            return
        if self._mode in (Mode.DATA, Mode.BDAT):
            self._mode = Mode.COMMAND
        self._push(str(replies.TEMP_ERROR.for_session(self.session_id)))

    def _process(self) -> None:
        """Answer every complete command (and content) the buffer holds."""
        if self._processing:
            return
        self._processing = True
        try:
            # Not while the client leaves our replies unread (the transport's buffer is
            # full): its input waits, and reading pauses below.
            while self._busy is None and not self._write_paused and not self._closing():
                mode = self._mode
                if mode is Mode.COMMAND:
                    if not self._next_command():
                        break
                elif mode is Mode.DATA:
                    if not self._feed_data():
                        break
                elif mode is Mode.BDAT:
                    if not self._feed_bdat():
                        break
                else:
                    break
            if self._busy is None:
                self._flush()
                if (self._eof and self._mode is Mode.COMMAND and not self._write_paused
                        and not self._closing()):
                    self._close()
                    return
            if len(self._buffer) > MAX_PENDING_INPUT or self._write_paused:
                self._pause()
            else:
                self._maybe_resume()
        finally:
            self._processing = False

    # -- commands ------------------------------------------------------------------------

    def _next_command(self) -> bool:
        """Answer one command line from the buffer; False when none is complete."""
        buffer = self._buffer
        newline = buffer.find(b"\n")
        if newline < 0:
            if len(buffer) > LINE_LIMIT:
                self._discarding = True
                buffer.clear()
            return False
        raw = bytes(buffer[:newline])
        del buffer[:newline + 1]
        if self._discarding or len(raw) > LINE_LIMIT:
            self._discarding = False
            self._push("500 Command line too long")
            return True
        self._command(raw.rstrip(b"\r\n"))
        return True

    def _command(self, line: bytes) -> None:
        if not line:
            self._push("500 Error: bad syntax")
            return
        command_bytes, _, arg_bytes = line.partition(b" ")
        try:
            command = command_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            self._push("500 Error: bad syntax")
            return
        arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") if arg_bytes else None
        limit = MAIL_LIMIT if self.extended_smtp and command == "MAIL" else COMMAND_LIMIT
        if len(line) > limit:
            self._push("500 Command line too long")
            return
        if self.require_starttls and not self.tls and command not in ALLOWED_BEFORE_STARTTLS:
            self._push("530 Must issue a STARTTLS command first")
            return
        method = COMMANDS.get(command)
        if method is None:
            self._bogus -= 1
            if self._bogus < 1:
                log.warning("smtp.bogus_commands")
                self._push("502 5.5.1 Too many unrecognized commands, goodbye.")
                self._close()
                return
            self._push(f'500 Error: command "{command}" not recognized')
            return
        self._reset_timeout()
        try:
            method(self, arg)
        except Exception as error:
            self._internal_error(error)

    def _helo_needed(self) -> bool:
        if not self.host_name:
            self._push("503 Error: send HELO first")
            return True
        return False

    def _rset_state(self) -> None:
        """A new transaction (RSET, HELO/EHLO, after a message): also ends an abandoned
        BDAT transfer's rate watch and budget share."""
        self.transfer.end()
        self.receiving = False
        self.envelope = Transaction()

    def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            self._push(str(replies.SYNTAX_ERROR.with_text("Syntax: EHLO hostname")))
            return
        if CONTROL.search(hostname):
            self._push(str(self._control_refused("ehlo", SessionVerdict.HELO_CONTROL_CHARACTER)))
            return
        if not self._count_reply():
            return
        self._rset_state()
        self.extended_smtp = True
        self.host_name = hostname
        self._out += replies.ehlo(self.hostname, self.data_size_limit,
                                  bool(self.tls_context and not self.tls))
        self._last_code = b"250"
        self._flush()

    def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname:
            self._push(str(replies.SYNTAX_ERROR.with_text("Syntax: HELO hostname")))
            return
        if CONTROL.search(hostname):
            self._push(str(self._control_refused("helo", SessionVerdict.HELO_CONTROL_CHARACTER)))
            return
        if not self._count_reply():
            return
        self._rset_state()
        self.extended_smtp = False
        self.host_name = hostname
        self._out += replies.helo(self.hostname)
        self._last_code = b"250"
        self._flush()

    def smtp_NOOP(self, arg: str | None) -> None:
        self._push("250 OK")

    def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            self._push("501 Syntax: RSET")
            return
        self._rset_state()
        self._push("250 OK")

    def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            self._push("501 Syntax: QUIT")
            return
        self._push("221 Bye")
        self._close()

    def smtp_EXPN(self, arg: str | None) -> None:
        self._push("502 EXPN not implemented")

    def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            self._push("501 Syntax: VRFY <address>")
            return
        address, _ = parse_path(arg)
        if address is None:
            self._push("502 Could not VRFY " + arg)
        else:
            self._push(str(replies.VRFY_CANNOT))

    def smtp_HELP(self, arg: str | None) -> None:
        code = 250
        if arg:
            syntax = SYNTAX.get(arg.upper())
            if syntax is not None and (arg.upper() != "STARTTLS" or self.tls_context):
                text, extended = syntax
                self._push("250 Syntax: " + text + (extended if self.extended_smtp else ""))
                return
            code = 501
        names = sorted(name for name in SYNTAX if name != "STARTTLS" or self.tls_context)
        self._push(f"{code} Supported commands: {' '.join(names)}")

    def smtp_AUTH(self, arg: str | None) -> None:
        if self._helo_needed_ehlo():
            return
        if not self.extended_smtp:
            self._push("500 Error: command 'AUTH' not recognized")
        elif not self.tls:
            self._push("538 5.7.11 Encryption required for requested authentication mechanism")
        elif not arg:
            self._push("501 Not enough value")
        elif len(arg.split()) > 2:
            self._push("501 Too many values")
        else:
            self._push(str(NO_AUTH_MECHANISM))

    def _helo_needed_ehlo(self) -> bool:
        if not self.host_name:
            self._push("503 Error: send EHLO first")
            return True
        return False

    def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            self._push("501 Syntax: STARTTLS")
            return
        if not self.tls_context:
            self._push("454 TLS not available")
            return
        if self.tls:
            self._push(str(TLS_ACTIVE))
            return
        self._push("220 Ready to start TLS")
        self._flush()
        # Whatever the client pipelined after STARTTLS was sent in the clear: dropped
        # (RFC 3207 section 4.2; the command injection of CVE-2011-0411).
        self._buffer.clear()
        self._mode = Mode.HANDSHAKE
        # Eager: start_tls hands the transport to TLS before anything more is read, so
        # whatever arrives from now on has come through the handshake.
        self._run(self._handshake(), self._tls_started, eager=True)

    async def _handshake(self) -> asyncio.Transport | None:
        assert self.transport is not None and self.tls_context is not None
        try:
            return await self.loop.start_tls(self.transport, self, self.tls_context,
                                             server_side=True)
        except Exception as error:  # the client's handshake failed: not our error
            log.info("smtp.tls_failed", error=type(error).__name__)
            return None

    def _tls_started(self, transport: asyncio.Transport | None) -> None:
        if transport is None:
            self._mode = Mode.CLOSED
            if self.transport is not None:
                self.transport.close()
            return
        self._read_paused = False
        self.transport = transport
        self.tls = True
        self.host_name = None
        self.extended_smtp = False
        self._rset_state()
        self._mode = Mode.COMMAND

    def _control_refused(self, command: str, verdict: SessionVerdict) -> Reply:
        log.info("smtp.command_rejected", command=command, reason="control character")
        return replies.answer(verdict, "smtp", self.metrics, stage=command)

    def smtp_MAIL(self, arg: str | None) -> None:
        if arg and CONTROL.search(arg):
            self._push(str(self._control_refused("mail",
                                                 SessionVerdict.SENDER_CONTROL_CHARACTER)))
            return
        if self.edge is not None and self.client_ip:
            decision = self.edge.message(self.client_ip)
            if decision.action is not EdgeAction.ACCEPT:
                self._edge_refused(decision, "mail")
                return
        if self._helo_needed():
            return
        syntaxerr = "501 Syntax: MAIL FROM: <address>"
        if self.extended_smtp:
            syntaxerr += " [SP <mail-parameters>]"
        if arg is None or arg[:5].upper() != "FROM:":
            self._push(syntaxerr)
            return
        address, rest = parse_path(arg[5:].strip())
        if address is None:
            self._push("553 5.1.3 Error: malformed address")
            return
        if not address or (not self.extended_smtp and rest):
            self._push(syntaxerr)
            return
        if self.envelope.mail_from:
            self._push("503 Error: nested MAIL command")
            return
        mail_options = (rest or "").upper().split()
        params = parse_params(mail_options)
        if params is None:
            self._push(syntaxerr)
            return
        body = params.pop("BODY", "7BIT")
        if body not in ("7BIT", "8BITMIME"):
            self._push("501 Error: BODY can only be one of 7BIT, 8BITMIME")
            return
        smtputf8 = params.pop("SMTPUTF8", False)
        if not isinstance(smtputf8, bool):
            self._push("501 Error: SMTPUTF8 takes no arguments")
            return
        self.envelope.smtp_utf8 = smtputf8
        size = params.pop("SIZE", None)
        if size:
            if isinstance(size, bool) or not (size.isascii() and size.isdigit()):
                self._push(syntaxerr)
                return
            if self.data_size_limit and int(size) > self.data_size_limit:
                self._push("552 Error: message size exceeds fixed maximum message size")
                return
        if params:
            self._push("555 MAIL FROM parameters not recognized or not implemented")
            return
        self._run(self.handler.handle_MAIL(self, self, self.envelope, address, mail_options),
                  self._push, eager=True)

    def smtp_RCPT(self, arg: str | None) -> None:
        if arg and CONTROL.search(arg):
            self._push(str(self._control_refused("rcpt",
                                                 SessionVerdict.RECIPIENT_CONTROL_CHARACTER)))
            self._rcpt_done(len(self.envelope.rcpt_tos))
            return
        accepted = len(self.envelope.rcpt_tos)
        if self._helo_needed():
            self._rcpt_done(accepted)
            return
        if not self.envelope.mail_from:
            self._push("503 Error: need MAIL command")
            self._rcpt_done(accepted)
            return
        syntaxerr = "501 Syntax: RCPT TO: <address>"
        if self.extended_smtp:
            syntaxerr += " [SP <mail-parameters>]"
        if arg is None or arg[:3].upper() != "TO:":
            self._push(syntaxerr)
            self._rcpt_done(accepted)
            return
        address, rest = parse_path(arg[3:].strip())
        if address is None:
            self._push("553 5.1.3 Error: malformed address")
        elif not address or (not self.extended_smtp and rest):
            self._push(syntaxerr)
        else:
            rcpt_options = (rest or "").upper().split()
            params = parse_params(rcpt_options)
            if params is None:
                self._push(syntaxerr)
            elif params:
                self._push("555 RCPT TO parameters not recognized or not implemented")
            else:
                envelope = self.envelope

                def routed(status: str) -> None:
                    self._push(status)
                    self._rcpt_done(accepted, envelope)
                # A task: a lookup that misses the cache may open a database connection,
                # which needs one (asyncio.timeout).
                self._run(self.handler.handle_RCPT(self, self, envelope, address, rcpt_options),
                          routed)
                return
        self._rcpt_done(accepted)

    def _rcpt_done(self, accepted: int, envelope: Transaction | None = None) -> None:
        """A dictionary attack's unit: an RCPT refused for good (never a 4xx)."""
        envelope = envelope or self.envelope
        if (self.edge is not None and self.client_ip and len(envelope.rcpt_tos) == accepted
                and self._last_code[:1] == b"5"):
            decision = self.edge.failed_rcpt(self.client_ip)
            if decision.action is not EdgeAction.ACCEPT:
                self._edge_refused(decision, "rcpt")

    # -- DATA ----------------------------------------------------------------------------

    def smtp_DATA(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        if arg:
            self._push(str(replies.SYNTAX_ERROR.with_text("Syntax: DATA")))
            return
        if not self.envelope.rcpt_tos:
            self._push(str(replies.BAD_SEQUENCE.with_text("Need RCPT command")))
            return
        if self.envelope.bdat_chunks or self.envelope.bdat_size:
            self._push(str(replies.BAD_SEQUENCE.with_text("DATA not allowed after BDAT")))
            return
        self._push(replies.START_MAIL_INPUT)
        self._flush()
        self.receiving = True
        self.transfer.start_rate_watch()
        self._mode = Mode.DATA
        # The CRLF that ended DATA opens the content: ".\r\n" at once is found alike.
        self._data = bytearray(b"\r\n")
        self._search_from = 0
        self._too_big = self._over_budget = False

    def _feed_data(self) -> bool:
        """Move the buffer into the message; at <CR><LF>.<CR><LF>, finish it."""
        data = self._data
        if self._buffer:
            self.transfer.window_bytes += len(self._buffer)
            data += self._buffer
            self._buffer.clear()
        end = data.find(TERMINATOR, self._search_from)
        if end < 0:
            limit = self.data_size_limit + 2
            if len(data) > limit:
                self._too_big = True
            elif not self._over_budget and not self.transfer.hold(len(data)):
                self._over_budget = True
                log.info("smtp.data_budget_exhausted", size=len(data))
            if self._too_big or self._over_budget:
                del data[2:-4]
                self.transfer.release()
            self._search_from = max(0, len(data) - len(TERMINATOR) + 1)
            self._reset_timeout(self.settings.data_timeout)
            return False
        self._buffer += memoryview(data)[end + len(TERMINATOR):]
        too_big = self._too_big or end > self.data_size_limit + 2
        over_budget = self._over_budget
        content = b"" if too_big or over_budget else bytes(memoryview(data)[2:end + 2])
        self._data = bytearray()
        self._mode = Mode.COMMAND
        self.transfer.stop_rate_watch()
        self._reset_timeout()
        if over_budget and not too_big:
            self._push(str(self._budget_refused()))
            self._message_done()
            return True
        self._run(self._finish(content, too_big, dot_stuffed=True), self._message_replied)
        return True

    def _message_replied(self, reply: Reply) -> None:
        self._push(str(reply))
        self._message_done()

    def _message_done(self) -> None:
        self._rset_state()
        self.receiving = False
        self.transfer.stop_rate_watch()
        if self.sessions.draining:
            self.close_with(replies.SHUTTING_DOWN)

    # -- BDAT (RFC 3030) -----------------------------------------------------------------

    def smtp_BDAT(self, arg: str | None) -> None:
        match = BDAT_ARGS.match((arg or "").strip())
        if match is None:
            # The chunk size is unknown, so the stream cannot be resynchronised.
            self._push(str(replies.SYNTAX_ERROR.with_text("Syntax: BDAT size [LAST]")))
            self._close()
            return
        size, last = int(match.group(1)), match.group(2) is not None
        envelope = self.envelope
        self.receiving = True
        self.transfer.start_rate_watch()
        keep = bool(not envelope.bdat_failed and envelope.rcpt_tos
                    and envelope.bdat_size + size <= self.data_size_limit)
        if keep and not self.transfer.hold(envelope.bdat_size + size):
            keep = False
            envelope.bdat_failed = replies.DATA_BUDGET_EXHAUSTED
            envelope.bdat_chunks.clear()
        self._bdat_left = self._bdat_size = size
        self._bdat_keep = keep
        self._bdat_last = last
        self._bdat_pieces = []
        self._mode = Mode.BDAT

    def _feed_bdat(self) -> bool:
        left = self._bdat_left
        if left and not self._buffer:
            self._reset_timeout(self.settings.data_timeout)
            return False
        if left:
            self._reset_timeout(self.settings.data_timeout)
            take = min(left, len(self._buffer))
            self.transfer.window_bytes += take
            if self._bdat_keep:
                self._bdat_pieces.append(bytes(memoryview(self._buffer)[:take]))
            del self._buffer[:take]
            self._bdat_left = left = left - take
            if left:
                return False
        self._mode = Mode.COMMAND
        self._bdat_chunk_read()
        return True

    def _bdat_chunk_read(self) -> None:
        envelope, size, last = self.envelope, self._bdat_size, self._bdat_last
        pieces, self._bdat_pieces = self._bdat_pieces, []
        chunk = b"".join(pieces) if len(pieces) != 1 else pieces[0]
        if last:
            self.transfer.stop_rate_watch()
        self._reset_timeout()
        if not self.host_name:
            self._push(str(replies.BAD_SEQUENCE.with_text("Send EHLO first")))
            self._bdat_ended(last)
            return
        if not envelope.rcpt_tos:
            self._push(str(replies.BAD_SEQUENCE.with_text("Need RCPT command")))
            self._bdat_ended(last)
            return
        envelope.bdat_size += size
        if envelope.bdat_failed is None and envelope.bdat_size > self.data_size_limit:
            envelope.bdat_failed = replies.reply_for(ContentVerdict.TOO_BIG)
        if envelope.bdat_failed is None:
            envelope.bdat_chunks.append(chunk)
        if not last:
            self._push(str(envelope.bdat_failed or replies.bdat_chunk_ok(size)))
            return
        if envelope.bdat_failed is replies.DATA_BUDGET_EXHAUSTED:
            self._push(str(self._budget_refused()))
            self._message_done()
            return
        data = b"".join(envelope.bdat_chunks)
        envelope.bdat_chunks.clear()
        self._run(self._finish(data, too_big=envelope.bdat_failed is not None,
                               dot_stuffed=False), self._message_replied)

    def _bdat_ended(self, last: bool) -> None:
        if last or not self.envelope.rcpt_tos:
            self.receiving = False
            self.transfer.stop_rate_watch()
            if self.sessions.draining:
                self.close_with(replies.SHUTTING_DOWN)

    # -- budgets: in-flight bytes and minimum data rate ---------------------------------

    def _budget_refused(self) -> Reply:
        self.transactions += 1
        log.warning("smtp.rejected", reason="data budget exhausted",
                    budget=self.data_budget.limit if self.data_budget else None)
        return replies.answer(SessionVerdict.DATA_BUDGET_EXHAUSTED, "smtp", self.metrics)

    def _data_too_slow(self, rate: float) -> None:
        log.info("smtp.data_too_slow", bytes_per_second=round(rate, 1),
                 minimum=self.settings.min_data_rate)
        self.close_with(replies.answer(SessionVerdict.DATA_TOO_SLOW, "smtp", self.metrics))

    # -- the message: the shared content step, then the pipeline -------------------------

    async def _iprev_result(self) -> Iprev | None:
        task = self._iprev
        if task is None:
            return None
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                return None
            raise

    async def _finish(self, data: bytes, too_big: bool, dot_stuffed: bool) -> Reply:
        """The message's reply; an unexpected error is 451 4.3.0 naming the session, and
        the transaction ends either way."""
        try:
            return await self._deliver(data, too_big, dot_stuffed)
        except Exception as error:
            log.error("smtp.internal_error", error=type(error).__name__, exc_info=error)
            return replies.TEMP_ERROR.for_session(self.session_id)

    async def _deliver(self, data: bytes, too_big: bool, dot_stuffed: bool) -> Reply:
        self.transactions += 1
        envelope = self.envelope
        ssl_object = self.transport.get_extra_info("ssl_object") if (
            self.tls and self.transport is not None) else None
        iprev = await self._iprev_result() if self._iprev is not None else None
        record = Envelope(
            session_id=self.session_id,
            queue_id=f"{self.session_id}.{self.transactions}",
            client_ip=self.client_ip,
            helo=self.host_name or "",
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from or "",
            recipients=tuple(envelope.accepted.mailboxes),
            tls=self.tls,
            tls_version=ssl_object.version() if ssl_object else None,
            smtputf8=envelope.smtp_utf8,
            esmtp=self.extended_smtp,
            bounce_tokens=tuple(envelope.accepted.bounce_tokens),
            iprev=iprev,
            dnsbl=self.dnsbl,
        )
        decision = accept_content(record, data, self.settings, self.hostname, too_big=too_big,
                                  dot_stuffed=dot_stuffed)
        if decision.content is None:
            return replies.answer(decision.verdict, "smtp", self.metrics)
        return await self.deliver(decision.content)


async def _resume(step: Coroutine[Any, Any, Any], waiting: Any) -> Any:
    """Go on with a coroutine that `NativeSession._run` started and that has to wait:
    wait for what it waits on, then send it on, until it returns."""
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                await asyncio.wait((waiting,))
        except asyncio.CancelledError:
            if waiting is not None:
                waiting.cancel()
            try:
                waiting = step.throw(asyncio.CancelledError())
            except StopIteration as stop:
                return stop.value
            continue
        try:
            waiting = step.send(None)
        except StopIteration as stop:
            return stop.value


# The commands a session answers, by name (aiosmtpd's smtp_* methods, with BDAT).
COMMANDS: dict[str, Callable[[NativeSession, str | None], None]] = {
    name[5:]: method for name, method in vars(NativeSession).items()
    if name.startswith("smtp_")
}
