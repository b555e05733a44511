"""`smtpd-agent apikey create --workspace <slug>`: keys for the inbox API."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import Settings
from ..store.apikeys import create_key


def register_apikeys(commands: Any, parents: Any) -> None:
    apikey = commands.add_parser("apikey", help="manage inbox API keys")
    actions = apikey.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", parents=[parents.common],
                                help="create a key for a workspace (printed once)")
    create.add_argument("--workspace", required=True, metavar="SLUG")
    create.add_argument("--name", help="what the key is for")
    create.set_defaults(handler=cmd_apikey_create)


async def cmd_apikey_create(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    created = await create_key(db, args.workspace, args.name)
    print(created.key)
    print(f"# key {created.prefix}... for workspace {created.workspace_slug}: shown once, "
          "stored only as its SHA-256. Send it as 'Authorization: Bearer <key>'.",
          flush=True)
    return 0
