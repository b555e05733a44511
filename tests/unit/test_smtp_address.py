"""MAIL FROM / RCPT TO paths: AgentSMTP's regex for the plain form agrees with aiosmtpd's parser,
and so does the native session layer's parse_path (smtp/session.py).

The reference is aiosmtpd's own SMTP._getaddr (email._header_value_parser),
called on the same session; an exception counts as an answer too.
"""

from __future__ import annotations

import asyncio
import string
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpd_agent.config import SmtpSettings
from smtpd_agent.smtp.server import AgentSMTP, ConnectionLimits, Sessions
from smtpd_agent.smtp.session import parse_path

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
# Characters with a meaning to the email package's parser, or that a plain path must not have.
NEAR = "<>@.()[]\\\":;, \t\x0b\r\n\x00=?é\udcff"


@pytest.fixture(scope="module")
def session() -> Iterator[AgentSMTP]:
    loop = asyncio.new_event_loop()
    try:
        yield AgentSMTP(object(), settings=SmtpSettings(), limits=ConnectionLimits(1, 1),
                        deliver=None, hostname="mx.test", sessions=Sessions(), loop=loop)  # type: ignore[arg-type]
    finally:
        loop.close()


def answer(getaddr: Any, session: AgentSMTP, arg: str) -> Any:
    try:
        return getaddr(session, arg)
    except Exception as error:  # aiosmtpd lets some through ("<" raises IndexError)
        return type(error)


def agree(session: AgentSMTP, arg: str, local_part_limit: int = 0) -> None:
    session.local_part_limit = local_part_limit
    try:
        reference = answer(SMTP._getaddr, session, arg)
        assert answer(AgentSMTP._getaddr, session, arg) == reference
        if not local_part_limit:  # the native layer has none, as AgentSMTP in service
            assert answer(lambda _, path: parse_path(path), session, arg) == reference
    finally:
        del session.local_part_limit


PLAIN = [
    ("<alice@example.com>", ("alice@example.com", "")),
    ("<Bob.Smith+tag@Mail.Example.CO.uk>", ("Bob.Smith+tag@Mail.Example.CO.uk", "")),
    ("<a@b> SIZE=123 BODY=8BITMIME", ("a@b", "SIZE=123 BODY=8BITMIME")),
    ("<a@b>\t \x0bSIZE=1", ("a@b", "SIZE=1")),
    ("<a@b>SIZE=1", ("a@b", "SIZE=1")),
    ("<a@b>\x0bSIZE=1", ("a@b", "\x0bSIZE=1")),
    ("<a@b>>", ("a@b", ">")),
    ("<bounce+a=b.c@bounce.x-y.example>", ("bounce+a=b.c@bounce.x-y.example", "")),
    ("<!#$%&'*+-/=?^_`{|}~@x>", ("!#$%&'*+-/=?^_`{|}~@x", "")),
    ("<a?=b@x>", ("a?=b@x", "")),
]

TRICKY = [
    "", "<>", "<> SIZE=1", "<", ">", "<@>", "<a@>", "<@b>", "<a>", "<a@b", "a@b", " <a@b>",
    "<a@b> (comment) SIZE=1", "<a@b>(comment)", "<a@b> (unclosed",
    '<"quoted local"@example.com>', '<"a"@b>', "<a\\b@c>",
    "<@relay.example:a@b>", "<@r1,@r2:a@b>", "<a@[192.0.2.1]>", "<a@[IPv6:2001:db8::1]>",
    "<a..b@c>", "<.a@c>", "<a.@c>", "<a@b..c>", "<a@.b>", "<a@b.>", "<a@b_c.d>",
    "<a@b@c>", "<a b@c>", "<a@b c>", "< a@b>", "<a@b >", "<a @b>", "<a@ b>",
    "<=?utf-8?q?abc?=@example.com>", "<=?x@y>", "<a@=?utf-8?q?b?=>",
    "<jörg@example.com>", "<a@exämple.com>", "<a\udcff@b>", "<a@b>\udcff",
    "<a\x00b@c>", "<a@b\x00>", "<A@B>\r\n", "<a@b>\r\nSIZE=1",
]


@pytest.mark.parametrize("arg, expected", PLAIN)
def test_plain_paths_never_reach_the_parser(session, monkeypatch, arg, expected):
    def parser(self: SMTP, arg: str) -> Any:
        raise AssertionError("aiosmtpd's parser was called")

    assert SMTP._getaddr(session, arg) == expected
    monkeypatch.setattr(SMTP, "_getaddr", parser)
    assert session._getaddr(arg) == expected


@pytest.mark.parametrize("arg", [a for a, _ in PLAIN] + TRICKY)
def test_tricky_paths_agree(session, arg):
    agree(session, arg)


@pytest.mark.parametrize("limit", [1, 5, 6])
def test_local_part_limit_applies(session, limit):
    for arg in ("<alice@example.com>", "<alice.@example.com>", '<"alice"@example.com>'):
        agree(session, arg, limit)


def path_like() -> st.SearchStrategy[str]:
    """Half plain paths, half with a near miss in any part."""
    plain_atom = st.text(ATEXT, min_size=1, max_size=8)
    plain_label = st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=8)
    atom = st.one_of(plain_atom, plain_atom, st.text(ATEXT + NEAR, max_size=6),
                     st.sampled_from(["=?utf-8?q?abc?=", "=?us-ascii?b?YWJj?=", "=?", '"q"']))
    label = st.one_of(plain_label, plain_label, st.text(string.ascii_letters + "-_=?[]é :",
                                                        max_size=6))
    tail = st.one_of(st.just(""), st.text(" \t\x0b\x85\r\n()SIZE=1BODY8é", max_size=10))

    def path(atoms: st.SearchStrategy[str], labels: st.SearchStrategy[str],
             lead: list[str], at: list[str], close: list[str]) -> st.SearchStrategy[str]:
        return st.builds(lambda *parts: "".join(parts), st.sampled_from(lead),
                         st.lists(atoms, min_size=1, max_size=3).map(".".join),
                         st.sampled_from(at), st.lists(labels, min_size=1, max_size=3).map(".".join),
                         st.sampled_from(close), tail)

    return st.one_of(path(plain_atom, plain_label, ["<"], ["@"], [">"]),
                     path(atom, label, ["<", "", " <", "<<", "<@r:", "<=?"], ["@", "", "@@", " @"],
                          [">", "", ">>", " >"]))


@settings(max_examples=2000, deadline=None)
@given(arg=path_like(), limit=st.sampled_from([0, 0, 1, 4, 64]))
def test_generated_paths_agree(session, arg, limit):
    agree(session, arg, limit)


@settings(max_examples=1000, deadline=None)
@given(arg=st.text(ATEXT + NEAR, max_size=30))
def test_any_text_agrees(session, arg):
    agree(session, arg)
