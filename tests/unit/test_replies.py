"""Reply codes: enhanced codes derived from the reply code, and added to aiosmtpd's own."""

from __future__ import annotations

import pytest

from smtpd_agent.smtp import replies
from smtpd_agent.smtp.replies import Reply, enhance

NAMED = [value for value in vars(replies).values() if isinstance(value, Reply)]


@pytest.mark.parametrize("reply", NAMED, ids=[str(r) for r in NAMED])
def test_class_digit_follows_the_reply_code(reply):
    assert str(reply).startswith(f"{reply.code} {reply.code // 100}.")
    assert reply.temporary == (400 <= reply.code < 500)


@pytest.mark.parametrize("line, expected", [
    (b"503 Error: need MAIL command", b"503 5.5.1 Error: need MAIL command"),
    (b"501 Syntax: MAIL FROM: <address>", b"501 5.5.4 Syntax: MAIL FROM: <address>"),
    (b"500 Error: bad syntax", b"500 5.5.2 Error: bad syntax"),
    (b"552 Error: message size exceeds fixed maximum message size",
     b"552 5.3.4 Error: message size exceeds fixed maximum message size"),
    (b"454 TLS not available", b"454 4.7.0 TLS not available"),
    (b"250 OK", b"250 2.0.0 OK"),
    (b"250-HELP", b"250-2.0.0 HELP"),
])
def test_builtin_replies_get_an_enhanced_code(line, expected):
    assert enhance(line) == expected


@pytest.mark.parametrize("line", [b"354 End data with <CR><LF>.<CR><LF>",
                                  b"550 5.1.1 Mailbox unavailable", b"220 mx ESMTP"[:0] + b"xyz"])
def test_lines_that_need_nothing_are_unchanged(line):
    assert enhance(line) == line


def test_temporary_builtins_never_get_a_permanent_code():
    for code in (421, 450, 451, 452, 454):
        assert enhance(b"%d something" % code).startswith(b"%d 4." % code)


def test_ehlo_reply_lists_the_extensions_and_starttls_only_when_offered():
    assert replies.ehlo("mx.test", 1000, False) == (
        b"250-mx.test\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-PIPELINING\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n")
    assert replies.ehlo("mx.test", 1000, True).endswith(b"250-CHUNKING\r\n250 STARTTLS\r\n")
