"""`smtpd-agent send-test` and `smtpd-agent outbound-worker`.

Registered into cli.COMMAND_GROUPS. `send-test` signs a short message with the
From domain's keys and hands it to the configured transport at once (not via
the queue), printing what the transport answered; `outbound-worker` runs the
queue worker alone, for hosts that send but do not receive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from typing import Any

from ..app import serve
from ..cli_common import Parents
from ..config import Settings
from ..domains import Domains
from ..addresses import OurDomains, parse_address
from ..store import directory
from ..store import domains as domain_store
from ..store.directory import DirectoryError
from .signing import SigningError, sign_message
from .transports import build_transport
from .verp import bounce_domain, new_token, verp_address
from .worker import OutboundWorker


def register_outbound(commands: Any, parents: Parents) -> None:
    common, listing = parents.common, parents.listing
    test = commands.add_parser("send-test", parents=[common, listing],
                               help="send a DKIM-signed test message through the transport")
    test.add_argument("--from", dest="sender", required=True, metavar="ADDRESS",
                      help="an address of ours, e.g. support@acme.<default domain>")
    test.add_argument("--to", dest="recipient", required=True, metavar="ADDRESS")
    test.add_argument("--subject", default="smtpd-agent test message")
    test.set_defaults(handler=cmd_send_test)
    worker = commands.add_parser("outbound-worker", parents=[common],
                                 help="run only the outbound delivery worker")
    worker.set_defaults(run=run_outbound_worker)


def run_outbound_worker(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(serve(settings, [OutboundWorker]))
    return 0


def compose_test_message(sender: str, recipient: str, subject: str, domain: str) -> bytes:
    now = datetime.now(UTC)
    return (f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
            f"Date: {format_datetime(now)}\r\nMessage-ID: {make_msgid(domain=domain)}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 7bit\r\n\r\n"
            f"This is a test message from smtpd-agent, sent {now:%Y-%m-%d %H:%M:%S} UTC.\r\n"
            "It is DKIM-signed (RSA and Ed25519) with the sending domain's keys.\r\n").encode()


async def cmd_send_test(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    parsed = parse_address(args.sender)
    if parsed is None or parse_address(args.recipient) is None:
        raise DirectoryError("--from and --to must be email addresses")
    ours = OurDomains(settings.server.default_domain)
    slug = ours.workspace(parsed.domain)
    custom = None
    if slug is not None:
        workspace_id = (await directory.get_workspace(db, slug)).id
    else:
        custom = await domain_store.find_domain(db, parsed.domain)
        if custom is None:
            raise DirectoryError(f"{parsed.domain} is neither <workspace>.{ours.default} nor a "
                                 "custom domain: we have no keys to sign for it")
        workspace_id = custom.workspace_id
    transport = build_transport(settings.outbound, settings.server.hostname)
    if transport is None:
        raise DirectoryError("no transport: set outbound.relay (or outbound.transport = \"ses\")")
    domains = Domains.open(db, settings)
    keys = await domains.signing_keys_for(workspace_id, parsed.domain)
    if not keys and slug is not None:
        await domains.default_record_set()
        keys = await domains.signing_keys_for(workspace_id, parsed.domain)
    raw = compose_test_message(args.sender, args.recipient, args.subject, parsed.domain)
    try:
        signed = sign_message(raw, keys)
    except SigningError as error:
        raise DirectoryError(f"not sent: {error}") from None
    mail_from = (args.sender if transport.name == "ses" else verp_address(
        settings.outbound.verp_prefix, new_token(),
        bounce_domain(parsed.domain, ours.default, settings.domains.default_mail_from_label,
                      custom.mail_from if custom else None)))
    await transport.start()
    try:
        result = await transport.send(mail_from, [args.recipient.strip("<>")], signed)
    finally:
        await transport.close()
    outcome = result.recipients[0]
    report = {"transport": transport.name, "mail_from": mail_from, "to": outcome.address,
              "code": outcome.code, "reply": outcome.text, "outcome": outcome.outcome.kind,
              "provider_message_id": result.provider_message_id,
              "selectors": [f"{k.selector} ({k.algorithm}, d={k.domain})" for k in keys]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{outcome.outcome.kind}: {transport.name} {outcome.code or 'no reply'} "
              f"{outcome.text}".rstrip())
        print(f"  Return-Path <{mail_from}>, signed by {', '.join(report['selectors'])}")
        if result.provider_message_id:
            print(f"  provider message id {result.provider_message_id}")
    return 0 if outcome.outcome.kind == "sent" else 1
