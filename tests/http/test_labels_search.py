"""Labels and full-text search over real HTTP and Postgres (issue 18): 'unread' on
arrival, PATCH to change labels, the inbox filtered by label; ranked search with
highlighted, escaped snippets and cursor pages, never across workspaces."""

from __future__ import annotations

import asyncio
import re
from email.message import EmailMessage
from email.policy import SMTP

from smtpd_agent.store.apikeys import Scope, create_key
from tests.http.test_api import bearer, deliver
from tests.http.test_mailbox_api import call
from tests.support import wait_searchable


def mail(subject: str, body: str, rcpt: str = "support@acme.agents.test") -> bytes:
    message = EmailMessage()
    message["From"] = "Alice <alice@example.org>"
    message["To"] = rcpt
    message["Subject"] = subject
    message["Message-ID"] = f"<{abs(hash((subject, body, rcpt)))}@example.org>"
    message.set_content(body + "\n")
    return message.as_bytes(policy=SMTP)


async def test_labels_unread_on_arrival_patch_and_filter(server, keys, http, db):
    writer = (await create_key(db, "acme", scopes=frozenset({Scope.READ, Scope.SEND}))).key
    for subject in ("first question", "second question"):
        assert await asyncio.to_thread(deliver, server.port, mail(subject, "hello")) == 250
    base = f"{server.http_url}/api/v1/workspaces/acme"
    _, unread, _ = await call(http, "GET", f"{base}/agents/support/inbox?label=unread",
                              keys.acme)
    assert [t["subject"] for t in unread["threads"]] == ["second question", "first question"]
    thread, other = unread["threads"]
    _, full, _ = await call(http, "GET", f"{base}/threads/{thread['id']}", keys.acme)
    [message] = full["messages"]
    assert message["labels"] == ["unread"]
    status, changed, _ = await call(http, "PATCH", f"{base}/messages/{message['id']}", writer,
                                    json={"add": ["vip", "crm:42"], "remove": ["unread"]})
    assert status == 200 and changed["labels"] == ["crm:42", "vip"]
    _, unread, _ = await call(http, "GET", f"{base}/agents/support/inbox?label=unread",
                              keys.acme)
    assert [t["id"] for t in unread["threads"]] == [other["id"]]
    _, vip, _ = await call(http, "GET", f"{base}/agents/support/inbox?label=vip", keys.acme)
    assert [t["id"] for t in vip["threads"]] == [thread["id"]]
    for body in ({"add": ["Bad Label"]}, {"add": "vip"}, {"remove": [5]},
                 {"add": [f"l{i}" for i in range(51)]}):
        status, refused, _ = await call(http, "PATCH", f"{base}/messages/{message['id']}",
                                        writer, json=body)
        assert status == 400 and refused["error"].startswith(f"{next(iter(body))}:"), body
    status, _, _ = await call(http, "GET", f"{base}/agents/support/inbox?label=Bad Label",
                              keys.acme)
    assert status == 400
    # scope and isolation: a read key 403, another workspace 404 and nothing changed
    status, _, _ = await call(http, "PATCH", f"{base}/messages/{message['id']}", keys.acme,
                              json={"add": ["x"]})
    assert status == 403
    globex = (await create_key(db, "globex", scopes=frozenset(Scope))).key
    for url in (f"{base}/messages/{message['id']}",
                f"{server.http_url}/api/v1/workspaces/globex/messages/{message['id']}"):
        status, _, _ = await call(http, "PATCH", url, globex, json={"add": ["x"]})
        assert status == 404
    assert await db.fetchval("SELECT labels FROM messages WHERE id = $1",
                             message["id"]) == ["crm:42", "vip"]


async def test_search_is_ranked_highlighted_paged_and_scoped(server, keys, http, db):
    sent = [mail("zebra crossing", "see the subject"),
            mail("other things", "a zebra in the <script>body</script> text, 1 < 2 & 3 > 2"),
            mail("unrelated", "nothing to find here")]
    for raw in sent:
        assert await asyncio.to_thread(deliver, server.port, raw) == 250
    assert await asyncio.to_thread(
        deliver, server.port, mail("zebra at globex", "zebra zebra",
                                   "support@globex.agents.test"),
        "support@globex.agents.test") == 250
    await wait_searchable(db)
    base = f"{server.http_url}/api/v1/workspaces/acme"
    status, found, _ = await call(http, "GET", f"{base}/search?q=zebras", keys.acme)
    assert status == 200
    # stemmed, both acme messages, the subject hit first; never globex's
    assert [r["subject"] for r in found["results"]] == ["zebra crossing", "other things"]
    body_hit = found["results"][1]
    assert "<mark>zebra</mark>" in body_hit["snippet"]
    # the message's markup never reaches the snippet as markup: only our <mark> tags
    assert set(re.findall(r"<[^>]*>", body_hit["snippet"])) == {"<mark>", "</mark>"}
    assert body_hit["agent"] == "support" and body_hit["labels"] == ["unread"]
    # pages of one, by cursor
    _, first, _ = await call(http, "GET", f"{base}/search?q=zebra&limit=1", keys.acme)
    _, second, _ = await call(http, "GET", f"{base}/search?q=zebra&limit=1&cursor="
                              f"{first['next_cursor']}", keys.acme)
    assert [r["subject"] for r in first["results"] + second["results"]] == [
        "zebra crossing", "other things"]
    assert second["next_cursor"] is None
    _, theirs, _ = await call(http, "GET",
                              f"{server.http_url}/api/v1/workspaces/globex/search?q=zebra",
                              keys.globex)
    assert [r["subject"] for r in theirs["results"]] == ["zebra at globex"]
    # the other workspace's key on acme's search: 404; bad input: 400
    status, refused, _ = await call(http, "GET", f"{base}/search?q=zebra", keys.globex)
    assert status == 404 and "results" not in refused
    for query, expected, says in (("", 400, "q:"), ("q=", 400, "q:"),
                                  ("q=zebra&limit=0", 400, "limit"),
                                  ("q=zebra&cursor=!!", 400, "cursor"),
                                  ("q=zebra&agent=nobody", 404, "agent")):
        async with http.get(f"{base}/search?{query}", headers=bearer(keys.acme)) as response:
            assert response.status == expected, query
            assert says in (await response.json())["error"], query
    # hostile query syntax is just text: the word in it is searched, the rest ignored
    status, found, _ = await call(http, "GET",
                                  f"{base}/search?q=zebra%27%29%20%7C%7C%20%21%28", keys.acme)
    assert status == 200
    assert [r["subject"] for r in found["results"]] == ["zebra crossing", "other things"]
    status, found, _ = await call(http, "GET", f"{base}/search?q=%27%29%20%7C%7C%20%21%28",
                                  keys.acme)
    assert status == 200 and found["results"] == []


def reply(subject: str, new: str, quoted: str, rcpt: str = "support@acme.agents.test") -> bytes:
    return mail(subject, f"{new}\n\nOn Mon, 30 Nov 2026 at 10:00, Acme Support "
                         f"<support@acme.agents.test> wrote:\n> {quoted}\n> second quoted line",
                rcpt)


async def test_search_finds_a_replys_new_text_not_what_it_quotes(server, keys, http, db):
    sent = [mail("the offer", "our price for the walnut cabinet is 120 EUR"),
            reply("Re: the offer", "Deal, please ship the kiwifruit crate too.",
                  "our price for the walnut cabinet is 120 EUR")]
    for raw in sent:
        assert await asyncio.to_thread(deliver, server.port, raw) == 250
    assert await asyncio.to_thread(
        deliver, server.port, reply("Re: globex", "kiwifruit for globex", "walnut",
                                    "support@globex.agents.test"),
        "support@globex.agents.test") == 250
    extracted = await db.fetchval("SELECT extracted_text FROM messages WHERE subject = $1",
                                  "Re: the offer")
    assert extracted == "Deal, please ship the kiwifruit crate too."
    await wait_searchable(db)
    base = f"{server.http_url}/api/v1/workspaces/acme"
    # a word only in the quoted part: the original matches, the reply quoting it does not
    status, found, _ = await call(http, "GET", f"{base}/search?q=walnut", keys.acme)
    assert status == 200
    assert [r["subject"] for r in found["results"]] == ["the offer"]
    assert "<mark>walnut</mark>" in found["results"][0]["snippet"]
    # a word of its new text: the reply, its snippet from the new text, highlighted
    status, found, _ = await call(http, "GET", f"{base}/search?q=kiwifruit", keys.acme)
    assert status == 200
    [hit] = found["results"]
    assert hit["subject"] == "Re: the offer"
    assert "<mark>kiwifruit</mark>" in hit["snippet"] and "walnut" not in hit["snippet"]
    # globex's reply has the same word: only globex's key on globex's path finds it
    _, theirs, _ = await call(http, "GET",
                              f"{server.http_url}/api/v1/workspaces/globex/search?q=kiwifruit",
                              keys.globex)
    assert [r["subject"] for r in theirs["results"]] == ["Re: globex"]
    # a row without extracted_text (outbound, or stored before it existed): its text body
    changed = await db.fetchrow("UPDATE messages SET extracted_text = NULL WHERE subject = $1 "
                                "RETURNING id, workspace_id", "Re: the offer")
    await db.execute("INSERT INTO search_queue VALUES ($1, $2)", *changed)
    await wait_searchable(db)
    _, found, _ = await call(http, "GET", f"{base}/search?q=walnut", keys.acme)
    assert sorted(r["subject"] for r in found["results"]) == ["Re: the offer", "the offer"]
