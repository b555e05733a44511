"""postmaster (RFC 5321 section 4.5.1): accepted at every domain we receive for, with or
without a domain, case-insensitive; a workspace's own postmaster agent first, else the
operator's mailbox named by routing.postmaster."""

from __future__ import annotations

from smtpd_agent.store import directory
from tests.support import Dialogue

MESSAGE = (b"From: mta@example.org\r\nTo: postmaster@acme.agents.test\r\n"
           b"Subject: %s\r\nMessage-ID: <%s@example.org>\r\n\r\nabuse report\r\n")


async def setup(db) -> None:
    for slug in ("acme", "globex", "hq"):
        await directory.add_workspace(db, slug)
    await directory.add_agent(db, "acme", "support")
    await directory.add_agent(db, "globex", "postmaster")
    await directory.add_agent(db, "hq", "ops", auto_reply=False)


def deliver(port: int, rcpts: list[str], tag: str) -> list[tuple[int, bytes]]:
    dialogue = Dialogue.open(port)
    dialogue.reply()
    dialogue.command("EHLO mta.example.org")
    dialogue.command("MAIL FROM:<mta@example.org>")
    answers = [dialogue.command(f"RCPT TO:<{rcpt}>") for rcpt in rcpts]
    if any(code == 250 for code, _ in answers):
        assert dialogue.command("DATA")[0] == 354
        dialogue.send(MESSAGE % (tag.encode(), tag.encode()) + b".\r\n")
        code, lines = dialogue.reply()
        answers.append((code, lines[-1]))
    dialogue.command("QUIT")
    return answers


async def stored(db) -> list[tuple[str, str, str]]:
    rows = await db.fetch(
        "SELECT w.slug, a.handle, m.rcpt_to FROM messages m JOIN agents a ON a.id = m.agent_id "
        "JOIN workspaces w ON w.id = m.workspace_id ORDER BY m.id")
    return [(r["slug"], r["handle"], r["rcpt_to"]) for r in rows]


async def test_postmaster_reaches_the_operator_mailbox(start_server, db):
    running = start_server(**{"routing.postmaster": "ops@hq.agents.test"})
    await setup(db)
    answers = deliver(running.port, ["postmaster@acme.agents.test", "Postmaster",
                                     "POSTMASTER@agents.test", "postmaster@gmail.com"], "p1")
    assert [code for code, _ in answers] == [250, 250, 250, 550, 250]
    assert answers[3][1].startswith(b"550 5.7.1")  # relaying denied, as for any address there
    # one message for the one mailbox the three addresses reached
    assert await stored(db) == [("hq", "ops", "postmaster@acme.agents.test")]


async def test_a_workspace_postmaster_agent_comes_first(start_server, db):
    running = start_server(**{"routing.postmaster": "ops@hq.agents.test"})
    await setup(db)
    assert [c for c, _ in deliver(running.port, ["postmaster@globex.agents.test"], "p2")] == \
        [250, 250]
    assert await stored(db) == [("globex", "postmaster", "postmaster@globex.agents.test")]


async def test_without_routing_postmaster_it_is_an_unknown_mailbox(start_server, db):
    running = start_server()
    await setup(db)
    answers = deliver(running.port, ["postmaster@acme.agents.test", "postmaster"], "p3")
    assert [code for code, _ in answers] == [550, 550]
    assert await stored(db) == []


async def test_a_postmaster_setting_naming_no_agent_refuses(start_server, db):
    running = start_server(**{"routing.postmaster": "nobody@hq.agents.test"})
    await setup(db)
    assert [c for c, _ in deliver(running.port, ["postmaster@acme.agents.test"], "p4")] == [550]
