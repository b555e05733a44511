"""`smtpd-agent apikey create --workspace <slug>`: keys for the inbox API."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..cli_common import Parents
from ..config import Settings
from ..store.apikeys import Scope, create_key, list_keys, parse_scopes, revoke_key
from ..store.directory import DirectoryError


def register_apikeys(commands: Any, parents: Parents) -> None:
    apikey = commands.add_parser("apikey", help="manage inbox API keys")
    actions = apikey.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", parents=[parents.common],
                                help="create a key for a workspace (printed once)")
    create.add_argument("--workspace", required=True, metavar="SLUG")
    create.add_argument("--name", help="what the key is for")
    create.add_argument("--scope", action="append", metavar="SCOPE",
                        choices=[s.value for s in Scope],
                        help="read (default), send or admin; repeat for several")
    create.set_defaults(handler=cmd_apikey_create)
    listed = actions.add_parser("list", parents=[parents.common, parents.listing],
                                help="a workspace's keys (prefixes only)")
    listed.add_argument("--workspace", required=True, metavar="SLUG")
    listed.set_defaults(handler=cmd_apikey_list)
    revoke = actions.add_parser("revoke", parents=[parents.common], help="revoke a key")
    revoke.add_argument("id", type=int, help="the key id (see apikey list)")
    revoke.add_argument("--workspace", required=True, metavar="SLUG")
    revoke.set_defaults(handler=cmd_apikey_revoke)


async def cmd_apikey_create(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    created = await create_key(db, args.workspace, args.name,
                               parse_scopes(args.scope or ["read"]))
    # The key alone on stdout, so `KEY=$(smtpd-agent apikey create ...)` just works; the
    # note goes to stderr.
    print(created.key, flush=True)
    scopes = ",".join(s.value for s in Scope if s in created.scopes)
    print(f"key {created.prefix}... ({scopes}) for workspace {created.workspace_slug}: shown once, "
          "stored only as its SHA-256. Send it as 'Authorization: Bearer <key>'.",
          file=sys.stderr)
    return 0


async def cmd_apikey_list(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    keys = await list_keys(db, args.workspace)
    if args.json:
        print(json.dumps([dict(vars(k)) for k in keys], indent=2, default=str))
        return 0
    for key in keys:
        state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
        used = f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never"
        print(f"{key.id:<6} {key.prefix}...  {state:<18} {','.join(key.scopes):<16} "
              f"last used {used:<16} {key.name or ''}")
    if not keys:
        print("no keys")
    return 0


async def cmd_apikey_revoke(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    if not await revoke_key(db, args.workspace, args.id):
        raise DirectoryError(f"no active key {args.id} in workspace {args.workspace!r}")
    print(f"key {args.id} revoked")
    return 0
