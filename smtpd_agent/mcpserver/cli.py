"""`smtpd-agent mcp`: the MCP server over stdio, for desktop and CLI agents that start it.

The workspace API key comes from SMTPD_AGENT_API_KEY or from a file (--api-key-file),
never from an argument (ps shows arguments to every user). The process talks to the
database directly with the store functions the HTTP API uses, so it needs nothing but
the database (no running `serve`, no HTTP port); the key is looked up again on every
tool call, so revoking it takes effect at once. stdout carries the protocol only; logs go
to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import structlog

from ..cli_common import Parents
from ..config import Settings
from ..extract.attachment import AttachmentText, Limits
from ..mailbox.send import Mailboxes
from ..metrics import Metrics
from ..store.apikeys import KeyOwner, find_key
from .tools import MailboxTools

log = structlog.get_logger(__name__)

KEY_ENV = "SMTPD_AGENT_API_KEY"
MAX_KEY_FILE = 4096


def register_mcp(commands: Any, parents: Parents) -> None:
    mcp = commands.add_parser(
        "mcp", parents=[parents.common],
        help="serve the workspace's mailboxes as MCP tools over stdio",
        description=f"Serve MCP over stdin/stdout. The workspace API key comes from "
                    f"${KEY_ENV} or --api-key-file; its scopes apply (read: read and "
                    f"search; send: also send, reply, drafts, labels).")
    mcp.add_argument("--api-key-file", metavar="FILE", type=Path,
                     help=f"read the API key from FILE instead of ${KEY_ENV}")
    mcp.set_defaults(handler=cmd_mcp)


def api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is not None:
        with open(args.api_key_file, "rb") as file:
            data = file.read(MAX_KEY_FILE + 1)
        return data.decode("utf-8", "replace").strip() or None
    return os.environ.get(KEY_ENV, "").strip() or None


async def cmd_mcp(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    try:
        key = api_key(args)
    except OSError as error:
        print(f"smtpd-agent: --api-key-file: {error.strerror}: {args.api_key_file}",
              file=sys.stderr)
        return 2
    if key is None:
        print(f"smtpd-agent: mcp needs a workspace API key in ${KEY_ENV} or --api-key-file "
              "(smtpd-agent apikey create --workspace SLUG)", file=sys.stderr)
        return 2
    owner = await find_key(db, key)
    if owner is None:
        print("smtpd-agent: the API key is not valid (unknown or revoked)", file=sys.stderr)
        return 2

    # the SDK only for this command (cli.py imports every group for every command)
    from mcp.server.stdio import stdio_server

    from .server import build_server

    async def current_owner(ctx: Any) -> KeyOwner | None:
        return await find_key(db, key)

    content = settings.content
    texts = AttachmentText(Limits(
        max_bytes=content.attachment_max_bytes, max_chars=content.attachment_max_chars,
        pdf_max_pages=content.pdf_max_pages, pdf_timeout=content.pdf_timeout,
        pdf_memory_mb=content.pdf_memory_mb), content.pdf_workers)
    tools = MailboxTools(db, Mailboxes(db, settings), texts, settings.mcp,
                         settings.server.default_domain)
    # counted for nobody (no /metrics over stdio), but counted the same way
    server = build_server(tools, current_owner, Metrics())
    log.info("mcp.stdio_started", key_id=owner.key_id, workspace=owner.workspace_slug)
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())
    log.info("mcp.stdio_stopped", key_id=owner.key_id)
    return 0
