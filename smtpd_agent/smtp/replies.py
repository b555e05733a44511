"""Every SMTP reply the server sends, named, with its RFC 3463 enhanced code.

Replies are decided here and nowhere else. The class digit of the enhanced
code is derived from the reply code (as mox does), so a 4xx can never carry a
5.x.x code. aiosmtpd's own built-in replies have no enhanced code; `enhance()`
gives them one on their way out (RFC 2034 section 3 exempts only the greeting
and the HELO/EHLO replies).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

ENHANCED = re.compile(rb"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}(\s|$)")


@dataclass(frozen=True)
class Reply:
    code: int
    detail: str  # the subject.detail part of the enhanced code, e.g. "1.1"
    text: str

    @property
    def enhanced(self) -> str:
        return f"{self.code // 100}.{self.detail}"

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.detail, text)

    def for_session(self, session_id: str) -> Reply:
        """The same reply naming our session, so the sender's log points at ours."""
        return self.with_text(f"{self.text} (session {session_id})")


# 2xx
MAIL_OK = Reply(250, "1.0", "Sender OK")
RCPT_OK = Reply(250, "1.5", "Recipient OK")
RSET_OK = Reply(250, "0.0", "OK")
NOOP_OK = Reply(250, "0.0", "OK")
CLOSING = Reply(221, "0.0", "Bye")
VRFY_CANNOT = Reply(252, "1.5", "Cannot VRFY user, but will accept message and attempt delivery")


# 3xx intermediate reply: RFC 2034 gives it no enhanced code.
START_MAIL_INPUT = "354 End data with <CR><LF>.<CR><LF>"


@functools.lru_cache(maxsize=16)
def ehlo(hostname: str, size: int | None, starttls: bool) -> bytes:
    """The multi-line EHLO reply (RFC 2034 gives it no enhanced code); built once per
    configuration, as every session of it sends the same one."""
    lines = [hostname, f"SIZE {size}", "8BITMIME", "SMTPUTF8",
             "PIPELINING", "ENHANCEDSTATUSCODES", "CHUNKING"]
    if starttls:
        lines.append("STARTTLS")
    return "".join(f"250{' ' if index == len(lines) - 1 else '-'}{text}\r\n"
                   for index, text in enumerate(lines)).encode()


def queued(message_ref: str) -> Reply:
    return Reply(250, "0.0", f"{message_ref} queued")


def bdat_chunk_ok(size: int) -> Reply:
    return Reply(250, "0.0", f"{size} octets received")


# 4xx: the sender keeps the message and retries
TEMP_STORE_FAILURE = Reply(451, "3.0", "Temporary local problem, try again later")
TEMP_ERROR = Reply(451, "3.0", "Internal error, try again later")
TEMP_ROUTING_FAILURE = Reply(451, "3.0", "Temporary lookup failure, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "5.3", "Too many recipients")
TOO_MANY_CONNECTIONS = Reply(421, "7.0", "Too many connections, try again later")
TIMEOUT = Reply(421, "4.2", "Timeout, closing connection")
SHUTTING_DOWN = Reply(421, "3.2", "Service shutting down, try again later")
TEMP_AUTH_FAILURE = Reply(451, "7.0", "DNS error during policy check, try again later")
TEMP_SCAN_FAILURE = Reply(451, "7.0", "Content scanner unavailable, try again later")
TEMP_SPAM_FAILURE = Reply(451, "7.0", "Spam filter unavailable, try again later")
SPAM_DEFERRED = Reply(451, "7.1", "Message deferred by the spam filter, try again later")
TOO_MANY_COMMANDS = Reply(421, "7.0", "Too many commands, closing connection")
DATA_TOO_SLOW = Reply(421, "4.2", "Data rate too low, closing connection")
DATA_BUDGET_EXHAUSTED = Reply(452, "3.1", "Insufficient system storage, try again later")

# 5xx: permanent
MAILBOX_UNKNOWN = Reply(550, "1.1", "Mailbox unavailable")
RELAY_DENIED = Reply(550, "7.1", "Relay access denied")
MESSAGE_TOO_BIG = Reply(552, "3.4", "Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = Reply(552, "3.4", "Message header exceeds fixed maximum size")
TOO_BIG_TO_SCAN = Reply(552, "3.4", "Message too big to scan")
TOO_BIG_TO_STORE = Reply(552, "3.4", "Message too big to store")
BARE_LF = Reply(550, "5.2", "Bare <LF> received, lines must end with <CR><LF>")
DMARC_REJECT = Reply(550, "7.1", "Message rejected: DMARC policy of the sender's domain")
SPF_REJECT = Reply(550, "7.23", "Message rejected: SPF check failed")
VIRUS_FOUND = Reply(554, "7.1", "Message rejected: virus found")
SPAM_REJECT = Reply(550, "7.1", "Message rejected as spam")
BAD_SEQUENCE = Reply(503, "5.1", "Bad sequence of commands")
SYNTAX_ERROR = Reply(501, "5.4", "Syntax error in parameters or arguments")
HELO_CONTROL_CHARACTER = Reply(501, "5.4", "Control characters are not allowed in the hostname")
SENDER_CONTROL_CHARACTER = Reply(553, "1.7", "Control characters are not allowed in the sender")
RECIPIENT_CONTROL_CHARACTER = Reply(553, "1.3",
                                    "Control characters are not allowed in the recipient")
COMMAND_UNRECOGNIZED = Reply(500, "5.1", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.6", "Line too long")
NOT_IMPLEMENTED = Reply(502, "5.1", "Command not implemented")
STARTTLS_REQUIRED = Reply(530, "7.0", "Must issue a STARTTLS command first")

# aiosmtpd's built-in replies, by (code, text prefix): the enhanced code to add.
BUILTIN_DETAILS: tuple[tuple[int, str, str], ...] = (
    (500, "Command line too long", "5.6"),
    (500, "Line too long", "5.6"),
    (500, "Error: bad syntax", "5.2"),
    (500, "Error: strict ASCII", "6.7"),
    (500, "Error: command", "5.1"),
    (501, "Syntax", "5.4"),
    (501, "Error: BODY", "5.4"),
    (501, "Error: SMTPUTF8", "5.4"),
    (502, "", "5.1"),
    (503, "Error: need MAIL", "5.1"),
    (503, "Error: need RCPT", "5.1"),
    (503, "Error: nested MAIL", "5.1"),
    (503, "Error: send HELO", "5.1"),
    (503, "Error: send EHLO", "5.1"),
    (503, "", "5.1"),
    (530, "", "7.0"),
    (552, "", "3.4"),
    (553, "", "1.3"),
    (554, "Command refused", "7.0"),
    (555, "", "5.4"),
    (250, "", "0.0"),
    (221, "", "0.0"),
    (252, "", "1.5"),
    (454, "", "7.0"),
    (421, "", "3.0"),
)


@functools.lru_cache(maxsize=256)
def enhance(line: bytes) -> bytes:
    """Add an enhanced status code to a reply line that lacks one.

    Cached: the lines aiosmtpd sends (greeting, "250 OK", "221 Bye") repeat every session.
    """
    if len(line) < 4 or not line[:3].isdigit() or ENHANCED.match(line):
        return line
    code = int(line[:3])
    if code < 200 or 300 <= code < 400:
        return line
    separator, text = line[3:4], line[4:]
    detail = _builtin_detail(code, text.decode("utf-8", "replace"))
    return b"%d%s%d.%s %s" % (code, separator, code // 100, detail.encode(), text)


def _builtin_detail(code: int, text: str) -> str:
    for known_code, prefix, detail in BUILTIN_DETAILS:
        if known_code == code and text.startswith(prefix):
            return detail
    return "0.0"
