"""Building a session: AgentSMTP gets the very tables aiosmtpd's SMTP.__init__ builds alone.

AgentSMTP narrows dir() while aiosmtpd introspects it and its handler (see its
docstring); the reference here is aiosmtpd's own __init__ run without that, on
the same class and handler, so an aiosmtpd upgrade that changes how the tables
are built fails these tests rather than the server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, auth_mechanism

from smtpd_agent.config import SmtpSettings
from smtpd_agent.smtp.handler import SessionHandler
from smtpd_agent.smtp.server import AgentSMTP, ConnectionLimits, Sessions

# Attributes AgentSMTP sets after aiosmtpd's __init__, on top of aiosmtpd's own.
OURS = {"settings", "limits", "deliver", "session_id", "sessions", "metrics", "receiving",
        "_pending_replies", "_greeted", "_deadline", "client_ip", "transactions", "started", "_bytes_in",
        "data_budget", "transfer", "_replies",
        "edge", "_iprev", "dnsbl", "_last_code"}


async def deliver(content: Any) -> Any:
    raise AssertionError("not called")


def session_for(handler: Any, loop: asyncio.AbstractEventLoop) -> AgentSMTP:
    return AgentSMTP(handler, settings=SmtpSettings(), limits=ConnectionLimits(10, 10),
                     deliver=deliver, hostname="mx.test", sessions=Sessions(), loop=loop)


def reference_for(handler: Any, loop: asyncio.AbstractEventLoop) -> AgentSMTP:
    """An AgentSMTP whose tables aiosmtpd's __init__ built with the full dir()."""
    session = AgentSMTP.__new__(AgentSMTP)
    SMTP.__init__(session, handler, hostname="mx.test", enable_SMTPUTF8=True, loop=loop)
    return session


def tables(session: SMTP, handler: Any) -> dict[str, Any]:
    """The method and hook tables, in order, each entry naming the object its method is bound to."""
    def bound(value: Any) -> tuple[Any, Any]:
        owner = getattr(value, "__self__", None)
        label = "session" if owner is session else "handler" if owner is handler else owner
        return label, getattr(value, "__func__", value)

    return {
        "auth": [(name, impl.is_builtin, *bound(impl.method))
                 for name, impl in session._auth_methods.items()],
        "handle": [(name, *bound(hook)) for name, hook in session._handle_hooks.items()],
        "smtp": [(name, *bound(method)) for name, method in session._smtp_methods.items()],
        "ehlo": session._ehlo_hook_ver,
    }


class FullHandler:
    """Every kind of hook aiosmtpd looks for, on the class and on the instance."""

    handle_NOTHING = None

    def __init__(self) -> None:
        self.handle_PROXY = self._proxy
        self.auth_INSTANCE = self._proxy

    async def _proxy(self, *args: Any) -> bool:
        return True

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        return responses

    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

    def handle_STARTTLS(self, server, session, envelope):
        return True

    async def auth_CRAM__MD5(self, server, args):
        return AuthResult(success=False)

    @auth_mechanism("PLAIN")  # replaces aiosmtpd's built-in PLAIN
    async def auth_custom_plain(self, server, args):
        return AuthResult(success=False)


class SlotsHandler:
    __slots__ = ()

    async def handle_RCPT(self, server, session, envelope, address, options):
        return "250 OK"


class OwnDirHandler:
    """A handler whose dir() is its own business: AgentSMTP leaves it alone."""

    def __dir__(self):
        return ["handle_MAIL", "handle_RSET"]

    async def handle_MAIL(self, server, session, envelope, address, options):
        return "250 OK"

    async def handle_RSET(self, server, session, envelope):
        return "250 OK"

    async def handle_VRFY(self, server, session, envelope, address):
        return "252 hidden by __dir__"


HANDLERS = {
    "session handler": lambda: SessionHandler(router=None, max_recipients=100),  # type: ignore[arg-type]
    "every kind of hook": FullHandler,
    "slots": SlotsHandler,
    "own __dir__": OwnDirHandler,
    "no hooks": object,
}


@pytest.mark.parametrize("make_handler", HANDLERS.values(), ids=HANDLERS.keys())
async def test_tables_are_the_ones_aiosmtpd_builds(make_handler):
    loop = asyncio.get_running_loop()
    handler = make_handler()
    session = session_for(handler, loop)
    reference = reference_for(handler, loop)
    assert tables(session, handler) == tables(reference, handler)
    assert session.event_handler is handler
    assert vars(session).keys() - OURS == vars(reference).keys()


async def test_the_handler_tables_are_not_empty():
    """Guards the comparison above against both sides finding nothing."""
    handler = FullHandler()
    found = tables(session_for(handler, asyncio.get_running_loop()), handler)
    assert {"EHLO", "DATA", "HELO", "MAIL", "RCPT", "BDAT", "QUIT"} <= {n for n, *_ in found["smtp"]}
    assert {n for n, *_ in found["handle"]} == {"EHLO", "DATA", "STARTTLS", "NOTHING", "PROXY"}
    assert {n: builtin for n, builtin, *_ in found["auth"]} == {
        "CRAM-MD5": False, "INSTANCE": False, "LOGIN": True, "PLAIN": False}
    assert found["ehlo"] == "new"


async def test_methods_are_bound_to_their_own_session():
    loop = asyncio.get_running_loop()
    handler = FullHandler()
    first, second = session_for(handler, loop), session_for(handler, loop)
    for session in (first, second):
        assert all(m.__self__ is session for m in session._smtp_methods.values())
        assert session._auth_methods["LOGIN"].method.__self__ is session
        assert session._auth_methods["CRAM-MD5"].method.__self__ is handler
        assert session._handle_hooks["DATA"].__self__ is handler
    assert first._smtp_methods["EHLO"].__func__ is AgentSMTP.smtp_EHLO
    assert first._smtp_methods["HELP"].__func__ is SMTP.smtp_HELP


async def test_dir_is_whole_again_after_init():
    session = session_for(SessionHandler(router=None, max_recipients=1),  # type: ignore[arg-type]
                          asyncio.get_running_loop())
    names = dir(session)
    assert "session_id" in names and "push" in names and "smtp_EHLO" in names


class OldEhloHandler:
    async def handle_EHLO(self, server, session, envelope, hostname):
        return "250 old"


class BadEhloHandler:
    async def handle_EHLO(self, server, session):
        return "250 bad"


async def test_old_ehlo_hook_warns_for_every_session_as_aiosmtpd_does():
    loop = asyncio.get_running_loop()
    handler = OldEhloHandler()
    for _ in range(2):
        with pytest.warns(DeprecationWarning, match="5-argument handle_EHLO"):
            session = session_for(handler, loop)
        assert session._ehlo_hook_ver == "old"


async def test_unsupported_ehlo_hook_is_refused_as_aiosmtpd_does():
    with pytest.raises(RuntimeError, match="Unsupported EHLO Hook"):
        session_for(BadEhloHandler(), asyncio.get_running_loop())
