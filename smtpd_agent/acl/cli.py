"""`smtpd-agent acl add|remove|list`: a workspace's (or one agent's) allow and block lists.

Registered into cli.COMMAND_GROUPS. Entries take effect at once where mail
leaves (the outbound queue asks the database each time); for receiving, a new
block within routing.cache_ttl (RCPT and DATA keep answers that let mail in
that long) and a removed one at once (refusals are never cached).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..cli_common import Parents, emit
from ..config import Settings
from ..store import acl as acl_store
from ..store import directory
from ..store.directory import DirectoryError
from . import AclAction, AclDirection, AclPatternError


def register_acl(commands: Any, parents: Parents) -> None:
    common, listing = parents.common, parents.listing
    acl = commands.add_parser("acl", help="allow and block lists of a workspace or an agent")
    actions = acl.add_subparsers(dest="action", required=True, metavar="ACTION")
    scope = argparse.ArgumentParser(add_help=False)
    scope.add_argument("--workspace", required=True, metavar="SLUG")
    scope.add_argument("--agent", metavar="HANDLE",
                       help="only this agent of the workspace (default: the whole workspace)")
    entry = argparse.ArgumentParser(add_help=False)
    kind = entry.add_mutually_exclusive_group(required=True)
    kind.add_argument("--block", dest="kind", action="store_const", const=AclAction.BLOCK)
    kind.add_argument("--allow", dest="kind", action="store_const", const=AclAction.ALLOW)
    entry.add_argument("--direction", choices=[d.value for d in AclDirection], default="both",
                       help="receive (refused at RCPT/DATA), send (never sent to), or both")
    entry.add_argument("pattern", metavar="ADDRESS|@DOMAIN",
                       help="bob@example.com, or @example.com (the domain and its subdomains)")
    add = actions.add_parser("add", parents=[common, scope, entry], help="add an entry")
    add.add_argument("--note", help="why (shown by `acl list`)")
    add.set_defaults(handler=cmd_acl_add)
    remove = actions.add_parser("remove", parents=[common, scope, entry], help="remove an entry")
    remove.set_defaults(handler=cmd_acl_remove)
    listed = actions.add_parser("list", parents=[common, listing, scope],
                                help="the workspace's entries (with --agent: and the agent's)")
    listed.set_defaults(handler=cmd_acl_list)


async def _scope(db: Any, args: argparse.Namespace) -> tuple[int, int | None]:
    workspace = await directory.get_workspace(db, args.workspace)
    if args.agent is None:
        return workspace.id, None
    agent = await directory.get_agent(db, workspace.slug, args.agent)
    return workspace.id, agent.id


def _where(args: argparse.Namespace) -> str:
    return f"{args.workspace}/{args.agent}" if args.agent else f"{args.workspace} (all agents)"


async def cmd_acl_add(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    workspace_id, agent_id = await _scope(db, args)
    try:
        pattern = await acl_store.add_entry(db, workspace_id, agent_id, args.kind,
                                            AclDirection(args.direction), args.pattern, args.note)
    except AclPatternError as error:
        raise DirectoryError(str(error)) from None
    print(f"{args.kind.value} {pattern} ({args.direction}) for {_where(args)}")
    return 0


async def cmd_acl_remove(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    workspace_id, agent_id = await _scope(db, args)
    try:
        removed = await acl_store.remove_entry(db, workspace_id, agent_id,
                                               AclDirection(args.direction), args.pattern,
                                               args.kind)
    except AclPatternError as error:
        raise DirectoryError(str(error)) from None
    if not removed:
        raise DirectoryError(f"no {args.kind.value} entry {args.pattern!r} ({args.direction}) "
                             f"for {_where(args)}")
    print(f"removed {args.kind.value} {args.pattern} ({args.direction}) for {_where(args)}")
    return 0


async def cmd_acl_list(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    workspace_id, agent_id = await _scope(db, args)
    rows = [dataclasses.asdict(e) for e in await acl_store.list_entries(db, workspace_id,
                                                                         agent_id)]
    emit(rows, args.json, lambda items: [
        f"#{r['id']:<5} {r['action']:<5} {r['direction']:<7} {r['pattern']:<40} "
        f"{r['workspace']}/{r['agent'] or '*'}" + (f"  ({r['note']})" if r["note"] else "")
        for r in items] or [f"no entries for {_where(args)}"])
    return 0
