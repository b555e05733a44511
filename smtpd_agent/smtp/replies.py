"""Every reply the server sends, named, with its RFC 3463 enhanced code; and the one
table that turns a decision into its reply.

A stage decides (ingress.py's recipient and content steps, auth, scan, the
pipeline); `answer()` looks the decision up in `REPLIES`, counts it, and
returns the SMTP reply; a webhook's HTTP status follows from that reply
(`http_answer`). The class digit of the enhanced code is derived from the
reply code (as mox does), so a 4xx can never carry a 5.x.x code. aiosmtpd's
own built-in replies have no enhanced code; `enhance()` gives them the one
`BUILTIN_DETAILS` names (RFC 2034 section 3 exempts only the greeting and the
HELO/EHLO replies).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import structlog

from ..auth import AuthReason
from ..ingress import ContentVerdict, RcptVerdict
from ..metrics import Metrics
from ..pipeline import MessageVerdict
from ..scan import ScanReason
from ..spam import SpamReason

log = structlog.get_logger("smtpd_agent.smtp")

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


@functools.lru_cache(maxsize=16)
def helo(hostname: str) -> bytes:
    """The HELO reply: our name, no enhanced code (RFC 2034 section 3)."""
    return f"250 {hostname}\r\n".encode()


QUEUED = Reply(250, "0.0", "queued")


def queued(message_ref: str) -> Reply:
    return QUEUED.with_text(f"{message_ref} {QUEUED.text}")


def bdat_chunk_ok(size: int) -> Reply:
    return Reply(250, "0.0", f"{size} octets received")


# 4xx: the sender keeps the message and retries
TEMP_STORE_FAILURE = Reply(451, "3.0", "Temporary local problem, try again later")
TEMP_ERROR = Reply(451, "3.0", "Internal error, try again later")
TEMP_ROUTING_FAILURE = Reply(451, "3.0", "Temporary lookup failure, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "5.3", "Too many recipients")
TOO_MANY_CONNECTIONS = Reply(421, "7.0", "Too many connections, try again later")
CLIENT_BANNED = Reply(421, "7.0", "Too much traffic from your address, try again later")
RATE_EXCEEDED = Reply(421, "7.0",
                      "Rate limit exceeded for your address, try again later")
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
# the mailbox's (or its workspace's) allow/block lists refuse the sender (acl/)
SENDER_REFUSED = Reply(550, "7.1", "Sender not accepted by this mailbox")
MESSAGE_TOO_BIG = Reply(552, "3.4", "Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = Reply(552, "3.4", "Message header exceeds fixed maximum size")
TOO_BIG_TO_SCAN = Reply(552, "3.4", "Message too big to scan")
TOO_BIG_TO_STORE = Reply(552, "3.4", "Message too big to store")
BARE_LF = Reply(550, "5.2", "Bare <LF> received, lines must end with <CR><LF>")
DMARC_REJECT = Reply(550, "7.1", "Message rejected: DMARC policy of the sender's domain")
SPF_REJECT = Reply(550, "7.23", "Message rejected: SPF check failed")
VIRUS_FOUND = Reply(554, "7.1", "Message rejected: virus found")
SPAM_REJECT = Reply(550, "7.1", "Message rejected as spam")


def client_listed(ip: str, zones: tuple[str, ...]) -> Reply:
    """554 at connect (RFC 5321 section 3.1) naming the DNSBLs, as Postfix's reply does."""
    return Reply(554, "7.1", f"Service refused: client [{ip}] listed by {', '.join(zones)}")


BAD_SEQUENCE = Reply(503, "5.1", "Bad sequence of commands")
SYNTAX_ERROR = Reply(501, "5.4", "Syntax error in parameters or arguments")
HELO_CONTROL_CHARACTER = Reply(501, "5.4", "Control characters are not allowed in the hostname")
SENDER_CONTROL_CHARACTER = Reply(553, "1.7", "Control characters are not allowed in the sender")
RECIPIENT_CONTROL_CHARACTER = Reply(553, "1.3",
                                    "Control characters are not allowed in the recipient")
# aiosmtpd's own texts (NOOP, RSET; require_starttls), named here for BUILTIN_DETAILS
NOOP_OK = Reply(250, "0.0", "OK")
STARTTLS_REQUIRED = Reply(530, "7.0", "Must issue a STARTTLS command first")


# --- decisions to replies -------------------------------------------------------------------

class SessionVerdict(Enum):
    """What the SMTP session refuses on its own, before a shared step sees the input."""

    HELO_CONTROL_CHARACTER = "control character in hostname"
    SENDER_CONTROL_CHARACTER = "control character in sender"
    RECIPIENT_CONTROL_CHARACTER = "control character in recipient"
    DATA_BUDGET_EXHAUSTED = "data budget exhausted"
    DATA_TOO_SLOW = "data rate too low"


# Every decision a stage returns, whichever way the message came (SMTP or a webhook).
Verdict = (RcptVerdict | ContentVerdict | AuthReason | ScanReason | SpamReason | MessageVerdict
           | SessionVerdict)

# The one table. A stage's reason is looked up only when the stage refused: "spf fail"
# is 550 when auth.spf_fail rejects it, and only noted in the A-R header otherwise.
REPLIES: Mapping[Verdict, Reply] = {
    RcptVerdict.MAILBOX: RCPT_OK,
    RcptVerdict.BOUNCE: RCPT_OK,
    RcptVerdict.UNKNOWN_MAILBOX: MAILBOX_UNKNOWN,
    RcptVerdict.RELAY_DENIED: RELAY_DENIED,
    RcptVerdict.TOO_MANY_RECIPIENTS: TOO_MANY_RECIPIENTS,
    RcptVerdict.TEMPFAIL: TEMP_ROUTING_FAILURE,
    RcptVerdict.SENDER_REFUSED: SENDER_REFUSED,
    ContentVerdict.TOO_BIG: MESSAGE_TOO_BIG,
    ContentVerdict.BARE_LF: BARE_LF,
    ContentVerdict.HEADER_TOO_BIG: HEADER_TOO_BIG,
    AuthReason.DMARC_REJECT: DMARC_REJECT,
    AuthReason.SPF_FAIL: SPF_REJECT,
    AuthReason.DNS_TEMPERROR: TEMP_AUTH_FAILURE,
    ScanReason.VIRUS: VIRUS_FOUND,
    ScanReason.TOO_LARGE: TOO_BIG_TO_SCAN,
    ScanReason.SCANNER_UNAVAILABLE: TEMP_SCAN_FAILURE,
    ScanReason.SCANNER_ERROR: TEMP_SCAN_FAILURE,
    SpamReason.SPAM: SPAM_REJECT,
    SpamReason.SOFT_REJECT: SPAM_DEFERRED,
    SpamReason.GREYLIST: SPAM_DEFERRED,
    SpamReason.FILTER_UNAVAILABLE: TEMP_SPAM_FAILURE,
    MessageVerdict.ACCEPTED: QUEUED,
    MessageVerdict.BOUNCE: QUEUED,
    MessageVerdict.STORE_TEMPFAIL: TEMP_STORE_FAILURE,
    MessageVerdict.TOO_BIG_TO_STORE: TOO_BIG_TO_STORE,
    SessionVerdict.HELO_CONTROL_CHARACTER: HELO_CONTROL_CHARACTER,
    SessionVerdict.SENDER_CONTROL_CHARACTER: SENDER_CONTROL_CHARACTER,
    SessionVerdict.RECIPIENT_CONTROL_CHARACTER: RECIPIENT_CONTROL_CHARACTER,
    SessionVerdict.DATA_BUDGET_EXHAUSTED: DATA_BUDGET_EXHAUSTED,
    SessionVerdict.DATA_TOO_SLOW: DATA_TOO_SLOW,
    MessageVerdict.BOUNCE_TEMPFAIL: TEMP_STORE_FAILURE,
    MessageVerdict.SENDER_REFUSED: SENDER_REFUSED,
    MessageVerdict.ACL_TEMPFAIL: TEMP_ROUTING_FAILURE,
}
# Decisions that are never a reply of their own: the stage went on to the next one.
NO_REPLY: frozenset[Verdict] = frozenset({
    ContentVerdict.ACCEPTED, AuthReason.NONE, AuthReason.DMARC_QUARANTINE,
    AuthReason.DMARC_TEMPERROR_QUARANTINE, AuthReason.DMARC_TEMPERROR_REJECT,
    ScanReason.CLEAN, ScanReason.NOT_SCANNED, SpamReason.NOT_SPAM,
})
# What a provider should do after a permanent refusal: stop retrying (Mailgun's and
# Postmark's documented "do not retry"; SES and SendGrid retry anything but 2xx).
WEBHOOK_PERMANENT_STATUS = {"ses": 200, "sendgrid": 200, "mailgun": 406, "postmark": 403}


def reply_for(verdict: Verdict, queue_id: str = "", session_id: str = "",
              signature: str | None = None) -> Reply:
    """The reply for a decision: the table's, naming what the client needs to know."""
    reply = REPLIES[verdict]
    if reply is QUEUED:
        return queued(queue_id)
    if reply is VIRUS_FOUND and signature:
        return reply.with_text(f"{reply.text} ({signature})")
    if reply is TEMP_STORE_FAILURE and session_id:
        return reply.for_session(session_id)
    return reply


def answer(verdict: Verdict, transport: str, metrics: Metrics | None, *, queue_id: str = "",
           session_id: str = "", signature: str | None = None, stage: str | None = None) -> Reply:
    """The reply for a decision, counted: every refusal of every way in is counted here
    (`stage`: the command it refused, when not RCPT or the message)."""
    reply = reply_for(verdict, queue_id, session_id, signature)
    if metrics is not None:
        stage = stage or ("rcpt" if isinstance(verdict, RcptVerdict) else "data")
        if reply.code >= 400:
            metrics.rejected_reply(transport, stage, verdict.value, reply.code)
        elif stage == "data":
            metrics.accepted.labels(transport).inc()
    return reply


def http_answer(reply: Reply, provider: str) -> tuple[str, int]:
    """A webhook's outcome and HTTP status for a reply: a temporary refusal is 503 so that
    the provider retries; a permanent one tells it to stop."""
    if reply.code < 300:
        return "accepted", 200
    if reply.temporary:
        return "tempfail", 503
    return "rejected", WEBHOOK_PERMANENT_STATUS[provider]


# --- aiosmtpd's own replies -----------------------------------------------------------------

# aiosmtpd's built-in replies without an enhanced code (aiosmtpd/smtp.py, 1.4), by reply
# code and full text, "{}" standing for what aiosmtpd fills in: the enhanced code to add.
# Its replies that carry one already ("421 4.7.0 ...", "553 5.1.3 ...") pass unchanged.
# tests/unit/test_replies.py checks every code aiosmtpd.testing.statuscodes lists is here.
BUILTIN_DETAILS: Mapping[tuple[int, str], str] = {
    (220, "Ready to start TLS"): "0.0",
    (221, "Bye"): "0.0",
    (250, NOOP_OK.text): NOOP_OK.detail,
    (250, "Syntax: {}"): "0.0",  # HELP <command>
    (250, "Supported commands: {}"): "0.0",  # HELP
    (252, VRFY_CANNOT.text): VRFY_CANNOT.detail,
    (454, "TLS not available"): "7.0",
    (500, "Error: bad syntax"): "5.2",
    (500, "Command line too long"): "5.6",
    (500, "Line too long (see RFC5321 4.5.3.1.6)"): "5.6",
    (500, "Error: strict ASCII mode"): "6.7",
    (500, 'Error: command "{}" not recognized'): "5.1",
    (500, "Error: command 'AUTH' not recognized"): "5.1",
    (501, "Syntax: {}"): "5.4",
    (501, "Supported commands: {}"): "5.4",  # HELP with an unknown command
    (501, "Error: BODY can only be one of 7BIT, 8BITMIME"): "5.4",
    (501, "Error: SMTPUTF8 disabled"): "5.4",
    (501, "Error: SMTPUTF8 takes no arguments"): "5.4",
    (501, "Not enough value"): "5.4",
    (501, "Too many values"): "5.4",
    (502, "EXPN not implemented"): "5.1",
    (502, "Could not VRFY {}"): "5.1",
    (503, "Already authenticated"): "5.1",
    (503, "Error: send EHLO first"): "5.1",
    (503, "Error: send HELO first"): "5.1",
    (503, "Error: need MAIL command"): "5.1",
    (503, "Error: nested MAIL command"): "5.1",
    (503, "Error: need RCPT command"): "5.1",
    (530, STARTTLS_REQUIRED.text): STARTTLS_REQUIRED.detail,
    (552, "Error: message size exceeds fixed maximum message size"): "3.4",
    (552, "Error: Too much mail data"): "3.4",
    (554, "Command refused due to lack of security"): "7.0",
    (555, "MAIL FROM parameters not recognized or not implemented"): "5.4",
    (555, "RCPT TO parameters not recognized or not implemented"): "5.4",
}
_EXACT = {key: detail for key, detail in BUILTIN_DETAILS.items() if "{}" not in key[1]}
_FILLED = [(code, re.compile(".*".join(map(re.escape, text.split("{}"))) + r"\Z", re.DOTALL),
            detail) for (code, text), detail in BUILTIN_DETAILS.items() if "{}" in text]


def builtin_detail(code: int, text: str) -> str | None:
    """The enhanced code's subject.detail for one of aiosmtpd's replies; None if unknown."""
    detail = _EXACT.get((code, text))
    if detail is not None:
        return detail
    return next((d for c, pattern, d in _FILLED if c == code and pattern.match(text)), None)


@functools.lru_cache(maxsize=256)
def enhance(line: bytes) -> bytes:
    """Add an enhanced status code to a reply line that lacks one.

    Cached: the lines aiosmtpd sends (greeting, "250 OK", "221 Bye") repeat every session.
    A line the table does not know (a newer aiosmtpd's) gets the class's X.0.0, and a log line.
    """
    if len(line) < 4 or not line[:3].isdigit() or ENHANCED.match(line):
        return line
    code = int(line[:3])
    if code < 200 or 300 <= code < 400:
        return line
    separator, text = line[3:4], line[4:]
    detail = builtin_detail(code, text.decode("utf-8", "replace"))
    if detail is None:
        log.warning("smtp.reply_unmapped", code=code, text=text[:80].decode("utf-8", "replace"))
        detail = "0.0"
    return b"%d%s%d.%s %s" % (code, separator, code // 100, detail.encode(), text)
