"""Authentication-Results: forged fields claiming our authserv-id go, everything else stays."""

from __future__ import annotations

import pytest

from smtpd_agent.auth import authenticate
from smtpd_agent.auth.results import (MAX_AUTHSERV_ID, MAX_LEADING_CFWS, claimed_authserv_id,
                                     prepend_results, strip_our_results)
from smtpd_agent.config import AuthSettings
from smtpd_agent.message import parse_message
from smtpd_agent.record import Envelope, InboundMessage

OURS = "mx.test.example"

RAW = (
    b"Received: from a by b; Sat, 21 Nov 2026 05:00:00 +0000\r\n"
    b"Authentication-Results: MX.Test.Example; dkim=pass header.d=bank.example\r\n"
    b"Authentication-Results: mx.other.example;\r\n\tspf=pass smtp.mailfrom=x@y.example\r\n"
    b"authentication-results: (forged, folded)\r\n mx.test.example.;\r\n\tdmarc=pass\r\n"
    b"ARC-Authentication-Results: i=1; mx.test.example; dkim=pass\r\n"
    b"From: Bank <ceo@bank.example>\r\n"
    b"Subject: Authentication-Results: mx.test.example; in a subject stays\r\n"
    b"\r\n"
    b"Authentication-Results: mx.test.example; in the body stays\r\n"
)


def test_strip_removes_only_ours_byte_identical():
    stripped = strip_our_results(RAW, OURS)
    expected = (
        b"Received: from a by b; Sat, 21 Nov 2026 05:00:00 +0000\r\n"
        b"Authentication-Results: mx.other.example;\r\n\tspf=pass smtp.mailfrom=x@y.example\r\n"
        b"ARC-Authentication-Results: i=1; mx.test.example; dkim=pass\r\n"
        b"From: Bank <ceo@bank.example>\r\n"
        b"Subject: Authentication-Results: mx.test.example; in a subject stays\r\n"
        b"\r\n"
        b"Authentication-Results: mx.test.example; in the body stays\r\n"
    )
    assert stripped == expected


def test_strip_without_forgery_is_identity():
    raw = b"From: a@b.example\nSubject: bare LF\n\nbody\n"
    assert strip_our_results(raw, OURS) is not None
    assert strip_our_results(raw, OURS) == raw
    assert strip_our_results(b"From: a@b.example\r\n", OURS) == b"From: a@b.example\r\n"


def test_claimed_authserv_id():
    assert claimed_authserv_id(b" (c (nested)) Mx.Test.Example ; spf=pass") == OURS
    assert claimed_authserv_id(b" mx.test.example 1; none") == OURS
    assert claimed_authserv_id(b"\r\n\tother.example; none") == "other.example"


def test_prepend_puts_ours_first():
    stamped = prepend_results(RAW, OURS, OURS + ";\r\n\tspf=pass smtp.mailfrom=a@b.example")
    assert stamped.startswith(b"Authentication-Results: mx.test.example;\r\n\tspf=pass")
    assert stamped.count(b"Authentication-Results: mx.other.example") == 1
    assert b"dkim=pass header.d=bank.example" not in stamped
    lf = prepend_results(b"From: a@b.example\n\nhi\n", OURS, OURS + ";\r\n\tspf=none")
    assert lf == b"Authentication-Results: mx.test.example;\n\tspf=none\nFrom: a@b.example\n\nhi\n"


async def test_stored_message_has_no_forgery_and_ours_first(dns_server, resolver):
    raw = (b"Authentication-Results: mx.test.example; dkim=pass header.d=bank.example;"
           b" dmarc=pass\r\nFrom: ceo@bank.example\r\nSubject: wire money\r\n\r\nnow\r\n")
    dns_server.txt("_dmarc.bank.example", "v=DMARC1; p=none")
    envelope = Envelope(session_id="s", client_ip="192.0.2.99", helo="evil.example",
                        mail_from="x@evil.example", recipients=())
    message = InboundMessage(envelope=envelope, raw=raw, parsed=parse_message(raw))
    result = await authenticate(message, resolver, AuthSettings(timeout=5), OURS)
    stored = result.stamp(raw)
    headers = parse_message(stored).headers
    results = [v for k, v in headers if k.lower() == "authentication-results"]
    assert len(results) == 1 and headers[0][0] == "Authentication-Results"
    assert "dmarc=fail" in results[0] and "dkim=none" in results[0]
    assert stored.endswith(b"From: ceo@bank.example\r\nSubject: wire money\r\n\r\nnow\r\n")


def test_claimed_authserv_id_quoted_and_escaped_comments():
    assert claimed_authserv_id(b' (a \\) still comment) "Mx.Test.Example"; none') == OURS
    assert claimed_authserv_id(b"(unclosed comment") == ""
    assert claimed_authserv_id(b"") == ""


@pytest.mark.timeout(10)  # an outer guard: the code before the fix needs minutes here
def test_deeply_nested_comments_take_one_bounded_pass():
    """Issue 16 #1: N '(' then N ')' (254 KB, under smtp.max_header_size) took 173 s of the
    event loop, one regex pass per nesting level. Now one pass over a bounded prefix."""
    shallow = b"(" * 100 + b")" * 100 + b" mx.test.example; dkim=pass"
    assert claimed_authserv_id(shallow) == OURS
    n = 127_000
    nested = b" " + b"(" * n + b")" * n + b" mx.test.example; dkim=pass"

    class Watched(bytes):
        """Records which parts of the value the parser reads."""

        def __getitem__(self, key):
            read.append(key)
            return bytes.__getitem__(self, key)

    read: list[object] = []
    assert claimed_authserv_id(Watched(nested)) == "(overlong)"
    assert read == [slice(None, MAX_LEADING_CFWS + MAX_AUTHSERV_ID)]
    # Too buried in comments to read: treated as claiming our id, so it goes.
    raw = b"Authentication-Results:" + nested + b"\r\nFrom: a@b.example\r\n\r\nbody\r\n"
    assert strip_our_results(raw, OURS) == b"From: a@b.example\r\n\r\nbody\r\n"


def test_a_forged_field_behind_long_comments_still_goes():
    forged = b"Authentication-Results: " + b"(x)" * 5000 + b" mx.test.example; dkim=pass\r\n"
    assert strip_our_results(forged + b"From: a@b.example\r\n\r\n", OURS) == \
        b"From: a@b.example\r\n\r\n"
