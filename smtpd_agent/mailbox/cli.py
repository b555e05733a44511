"""`smtpd-agent drafts list|send|discard`: approve or drop what agents wrote in draft mode.

The same store and send path as the HTTP API's drafts routes (mailbox/send.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..cli_common import Parents, emit
from ..config import Settings
from ..store import mailbox as queries
from ..store.directory import get_workspace
from .send import Mailboxes, SendError, send_draft


def register_drafts(commands: Any, parents: Parents) -> None:
    drafts = commands.add_parser("drafts", help="drafts waiting to be sent or discarded")
    actions = drafts.add_subparsers(dest="action", required=True, metavar="ACTION")
    listed = actions.add_parser("list", parents=[parents.common, parents.listing],
                                help="a workspace's pending drafts")
    listed.add_argument("--workspace", required=True, metavar="SLUG")
    listed.add_argument("--agent", metavar="HANDLE")
    listed.set_defaults(handler=cmd_drafts_list)
    for name, handler, help_text in (("send", cmd_drafts_send, "send a draft"),
                                     ("discard", cmd_drafts_discard, "discard a draft")):
        action = actions.add_parser(name, parents=[parents.common], help=help_text)
        action.add_argument("id", type=int, help="the draft id (see drafts list)")
        action.add_argument("--workspace", required=True, metavar="SLUG")
        action.set_defaults(handler=handler)


async def cmd_drafts_list(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    workspace = await get_workspace(db, args.workspace)
    agent_id = None
    if args.agent:
        found = await queries.agent(db, workspace.id, args.agent)
        if found is None:
            print(f"no agent {args.agent!r} in workspace {workspace.slug!r}", file=sys.stderr)
            return 1
        agent_id = found["id"]
    rows = await queries.drafts(db, workspace.id, agent_id, limit=1000)
    emit(rows, args.json, lambda items: [
        f"#{r['id']:<6} {r['agent']:<16} to={','.join(r['to']) or '-'} "
        f"thread={r['thread_id'] or '-'} {r['origin']:<5} {r['subject'] or ''}"
        for r in items] or ["no drafts"])
    return 0


async def cmd_drafts_send(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    workspace = await get_workspace(db, args.workspace)
    mailboxes = Mailboxes(db, settings)
    try:
        sent = await send_draft(mailboxes, workspace.id, workspace.slug, args.id)
    except SendError as error:
        print(f"draft {args.id} not sent: {error.message}", file=sys.stderr)
        return 1
    print(f"draft {args.id} sent as message {sent.message_id} in thread {sent.thread_id} "
          "(queued for delivery)")
    return 0


async def cmd_drafts_discard(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    workspace = await get_workspace(db, args.workspace)
    if not await queries.discard_draft(db, workspace.id, args.id):
        print(f"no pending draft {args.id} in workspace {workspace.slug!r}", file=sys.stderr)
        return 1
    print(f"draft {args.id} discarded")
    return 0
