"""The `smtpd-agent` command: serve, migrate, workspaces, agents, inbox, quarantine.

Every command that touches the database takes the same --config and
--state-dir (or DATABASE_URL), so with the embedded Postgres it attaches to the
server a running `serve` started rather than starting a second one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .acl.cli import register_acl
from .agent.cli import register_agent
from .app import DNS_SERVICES, listener_services, serve
from .cli_common import Parents, deployment_settings, emit, with_database
from .config import ConfigError, Settings, load_settings
from .domains.cli import register_domains
from .outbound.cli import register_outbound
from .domains.keys import KeyStoreError
from .events.retention import PassResult, Pruner
from .http.cli import register_apikeys
from .mailbox.cli import register_drafts
from .mcpserver.cli import register_mcp
from .logs import configure_logging
from .metrics import Metrics
from .runtime import Database
from .addresses import OurDomains, parse_address
from .smtp.limits import CounterTable
from .store import deployment, directory, inbox, quarantine
from .store.database import migrate
from .store.directory import DirectoryError
from .store.quarantine import QuarantineError


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="settings file (default: config/smtpd-agent.toml if present)")
    common.add_argument("--state-dir", metavar="DIR",
                        help="where the embedded Postgres lives when DATABASE_URL is unset")
    common.add_argument("--default-domain", metavar="D",
                        help="the operator's domain: agents are <handle>@<workspace>.<D>")
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--json", action="store_true", help="print JSON")
    parents = Parents(common, listing)

    parser = argparse.ArgumentParser(
        prog="smtpd-agent", description="An SMTP server that gives AI agents email addresses.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMAND_GROUPS:
        register(commands, parents)
    return parser


def register_core(commands: Any, parents: Parents) -> None:
    common, listing = parents.common, parents.listing
    serve_cmd = commands.add_parser("serve", parents=[common], help="run the SMTP server")
    serve_cmd.add_argument("--host", help="bind address (smtp.host)")
    serve_cmd.add_argument("--port", type=int, help="bind port (smtp.port)")
    serve_cmd.add_argument("--http-host", help="HTTP bind address (http.host)")
    serve_cmd.add_argument("--http-port", type=int, help="HTTP bind port (http.port)")
    serve_cmd.add_argument("--listener-only", action="store_true", help=argparse.SUPPRESS)
    # FD:SLOT of the parent's shared connection table (smtpd_agent/smtp/limits.py)
    serve_cmd.add_argument("--connection-table", help=argparse.SUPPRESS)
    serve_cmd.set_defaults(run=run_serve)
    prune = commands.add_parser(
        "prune", parents=[common],
        help="one retention pass now ([retention]): old events and finished webhook "
             "deliveries, as serve does every retention.interval")
    prune.set_defaults(run=run_prune)
    dns_cmd = commands.add_parser(
        "dns-serve", parents=[common],
        help="run only the authoritative DNS server for delegated zones")
    dns_cmd.add_argument("--listen", metavar="ADDRESS:PORT",
                         help="UDP and TCP address (dns_server.listen), e.g. 0.0.0.0:53")
    dns_cmd.set_defaults(run=run_dns_serve)

    commands.add_parser("migrate", parents=[common], help="apply database migrations") \
        .set_defaults(handler=cmd_migrate, migrate_first=False)

    identity = commands.add_parser(
        "deployment", help="the deployment's identity (its default domain) in the database")
    identity_cmds = identity.add_subparsers(dest="action", required=True, metavar="ACTION")
    identity_cmds.add_parser("show", parents=[common, listing],
                             help="the recorded default domain and the hosts that served it") \
        .set_defaults(handler=cmd_deployment_show, identity_check=False)
    set_domain = identity_cmds.add_parser(
        "set-domain", parents=[common],
        help="change the deployment's default domain on purpose (workspace addresses move)")
    set_domain.add_argument("domain", help="the new default domain")
    set_domain.set_defaults(handler=cmd_deployment_set_domain, identity_check=False)

    workspace = commands.add_parser("workspace", help="manage workspaces")
    workspace_cmds = workspace.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = workspace_cmds.add_parser("add", parents=[common], help="create a workspace")
    add.add_argument("slug", help="lower-case name, the label under the default domain")
    add.add_argument("--name", help="display name")
    add.set_defaults(handler=cmd_workspace_add)
    workspace_cmds.add_parser("list", parents=[common, listing], help="list workspaces") \
        .set_defaults(handler=cmd_workspace_list)

    agent = commands.add_parser("agent", help="manage agents")
    agent_cmds = agent.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = agent_cmds.add_parser("add", parents=[common], help="create an agent mailbox")
    add.add_argument("address", help="<handle>@<workspace>.<default domain>")
    add.add_argument("--name", help="display name used in replies")
    add.add_argument("--prompt", help="the agent's system prompt")
    add.add_argument("--no-auto-reply", action="store_true", help="store mail but never answer")
    add.set_defaults(handler=cmd_agent_add)
    listed = agent_cmds.add_parser("list", parents=[common, listing], help="list agents")
    listed.add_argument("--workspace", metavar="SLUG")
    listed.set_defaults(handler=cmd_agent_list)
    disable = agent_cmds.add_parser("disable", parents=[common], help="stop accepting mail")
    disable.add_argument("address")
    disable.set_defaults(handler=cmd_agent_disable)
    enable = agent_cmds.add_parser("enable", parents=[common], help="accept mail again")
    enable.add_argument("address")
    enable.set_defaults(handler=cmd_agent_enable)

    inbox_cmd = commands.add_parser("inbox", parents=[common, listing],
                                    help="an agent's threads, newest first")
    inbox_cmd.add_argument("address", help="the agent's address")
    inbox_cmd.add_argument("--limit", type=int, default=50, help="threads to show")
    inbox_cmd.set_defaults(handler=cmd_inbox)

    held = commands.add_parser("quarantine",
                               help="mail held from the agents (spam, DMARC quarantine)")
    held_cmds = held.add_subparsers(dest="action", required=True, metavar="ACTION")
    listed = held_cmds.add_parser("list", parents=[common, listing],
                                  help="held messages, newest first, with why each is held")
    listed.add_argument("--workspace", metavar="SLUG")
    listed.add_argument("--limit", type=int, default=100, help="messages to show")
    listed.set_defaults(handler=cmd_quarantine_list)
    released = held_cmds.add_parser(
        "release", parents=[common],
        help="make a held message visible to its agent and queue the agent's job")
    released.add_argument("message_id", type=int, help="the message id (from the list)")
    released.add_argument("--workspace", metavar="SLUG", help="only if it is in this workspace")
    released.set_defaults(handler=cmd_quarantine_release)


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for flag, key in (("state_dir", "server.state_dir"), ("default_domain", "server.default_domain"),
                      ("host", "smtp.host"), ("port", "smtp.port"),
                      ("listen", "dns_server.listen"),
                      ("http_host", "http.host"), ("http_port", "http.port")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return load_settings(args.config, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ConfigError as error:
        print(f"smtpd-agent: configuration error: {error}", file=sys.stderr)
        return 2
    quiet = not hasattr(args, "run") and settings.log.level != "debug"
    configure_logging(dataclasses.replace(settings.log, level="warning") if quiet else settings.log)
    try:
        if hasattr(args, "run"):
            return args.run(settings, args)
        return asyncio.run(with_database(settings, args.handler, args))
    except (DirectoryError, ConfigError, KeyStoreError, QuarantineError) as error:
        print(f"smtpd-agent: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run_serve(settings: Settings, args: argparse.Namespace) -> int:
    # SIGHUP re-reads the same file, environment and flags as start-up did.
    if args.listener_only:  # one of the smtp.processes extra listeners, started by serve
        table = None
        if args.connection_table:
            fd, _, slot = args.connection_table.partition(":")
            table = CounterTable.attach(int(fd), int(slot))
        asyncio.run(serve(settings, listener_services(table), reload=lambda: settings_from(args)))
        return 0
    asyncio.run(serve(settings, reload=lambda: settings_from(args),
                      listener_args=listener_args(args)))
    return 0


def run_prune(settings: Settings, args: argparse.Namespace) -> int:
    """For cron or by hand (with retention.interval = 0 on the servers, or to catch up):
    the pass serve runs, under the same lock, so it never races a server's."""
    async def prune() -> PassResult:
        database = await Database.open(settings)
        try:
            return await Pruner(database.url, settings.retention, Metrics(),
                                settings.database.connect_timeout,
                                settings.database.command_timeout).run_once()
        finally:
            await database.close()

    if settings.retention.keeps_everything:
        print("retention keeps everything: [retention] events_days, webhook_delivered_days "
              "and webhook_failed_days are all 0")
        return 0
    result = asyncio.run(prune())
    if not result.ran:
        print("skipped: another process is pruning this database now")
        return 0
    print(f"deleted {result.events} events, {result.delivered} delivered and {result.failed} "
          f"failed webhook deliveries; kept {result.kept_for_deliveries} old events that "
          "deliveries still need")
    return 0


def listener_args(args: argparse.Namespace) -> list[str]:
    """The flags an extra listener process (smtp.processes) gets: ours, the config file's
    path made absolute, and never a setting's value in the environment; app.py adds the
    bound port."""
    forwarded: list[str] = []
    if args.config is not None:
        forwarded += ["--config", str(Path(args.config).resolve())]
    for flag, name in (("state_dir", "--state-dir"), ("default_domain", "--default-domain"),
                       ("host", "--host")):
        value = getattr(args, flag, None)
        if value is not None:
            forwarded += [name, str(Path(value).resolve()) if flag == "state_dir" else value]
    return forwarded


def run_dns_serve(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.dns_server.listen:
        print("smtpd-agent: dns-serve needs dns_server.listen (or --listen ADDRESS:PORT)",
              file=sys.stderr)
        return 2
    asyncio.run(serve(settings, DNS_SERVICES))
    return 0


def mailbox_of(address: str, settings: Settings) -> tuple[str, str]:
    """(workspace slug, handle) of an agent address under the default domain."""
    parsed = parse_address(address)
    if parsed is None:
        raise DirectoryError(f"{address!r} is not an email address")
    slug = OurDomains(settings.server.default_domain).workspace(parsed.domain)
    if slug is None:
        raise DirectoryError(f"{address!r} is not <handle>@<workspace>."
                             f"{settings.server.default_domain}")
    if parsed.tag is not None:
        raise DirectoryError(f"{address!r}: an agent address has no +tag")
    return slug, parsed.local


async def cmd_migrate(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    async with db.acquire() as connection:
        applied = await migrate(connection)
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    settings = await deployment_settings(db, settings, args)
    domain = await deployment.record(db, settings.server.default_domain)
    print(f"deployment: default domain {domain}")
    return 0


async def cmd_deployment_show(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    identity = await deployment.recorded(db)
    if identity is None:
        emit(None, args.json, lambda _: [
            "no deployment recorded yet: the first `serve` or `migrate` records its "
            f"default domain (here: {settings.server.default_domain})"])
        return 0
    emit(dataclasses.asdict(identity), args.json, lambda data: [
        f"default domain: {data['default_domain']}",
        f"recorded:       {data['recorded_at']:%Y-%m-%d %H:%M:%S %Z}"
        + (f", changed {data['changed_at']:%Y-%m-%d %H:%M:%S %Z}" if data["changed_at"] else ""),
        *(f"host:           {name} (last started {when:%Y-%m-%d %H:%M:%S %Z})"
          for name, when in data["hosts"])])
    return 0


async def cmd_deployment_set_domain(db: Any, settings: Settings,
                                    args: argparse.Namespace) -> int:
    domain = args.domain.strip().lower()
    settings.replace({"server.default_domain": domain})  # validated like the file's value
    previous = await deployment.set_domain(db, domain)
    if previous == domain:
        print(f"the deployment's default domain is already {domain}")
        return 0
    print(f"the deployment's default domain is now {domain} (was {previous or 'not recorded'}): "
          f"workspaces receive at <workspace>.{domain}. Start every server with "
          f"server.default_domain = \"{domain}\" (or --default-domain {domain}); a server "
          f"still configured with {previous} refuses to start.")
    return 0


async def cmd_workspace_add(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    workspace = await directory.add_workspace(db, args.slug, args.name)
    domain = OurDomains(settings.server.default_domain).workspace_domain(workspace.slug)
    print(f"workspace {workspace.slug} created: agents are <handle>@{domain}")
    return 0


async def cmd_workspace_list(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    ours = OurDomains(settings.server.default_domain)
    workspaces = [dict(vars(w), domain=ours.workspace_domain(w.slug))
                  for w in await directory.list_workspaces(db)]
    emit(workspaces, args.json, lambda rows: [f"{w['slug']:<24} {w['domain']:<40} {w['name']}"
                                              for w in rows] or ["no workspaces"])
    return 0


def _agent_view(agent: directory.Agent, settings: Settings) -> dict[str, Any]:
    ours = OurDomains(settings.server.default_domain)
    return dict(vars(agent), address=ours.agent_address(agent.handle, agent.workspace_slug))


async def cmd_agent_add(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    slug, handle = mailbox_of(args.address, settings)
    agent = await directory.add_agent(db, slug, handle, display_name=args.name,
                                      system_prompt=args.prompt,
                                      auto_reply=not args.no_auto_reply)
    view = _agent_view(agent, settings)
    print(f"agent {view['address']} created (auto-reply {'on' if agent.auto_reply else 'off'})")
    return 0


async def cmd_agent_list(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    agents = [_agent_view(a, settings) for a in await directory.list_agents(db, args.workspace)]
    emit(agents, args.json, lambda rows: [
        f"{a['address']:<48} {'enabled' if a['enabled'] else 'disabled':<9} "
        f"auto-reply={'on' if a['auto_reply'] else 'off'}  {a['display_name'] or ''}"
        for a in rows] or ["no agents"])
    return 0


async def _set_enabled(db: Any, settings: Settings, args: argparse.Namespace, enabled: bool) -> int:
    slug, handle = mailbox_of(args.address, settings)
    agent = await directory.set_agent_enabled(db, slug, handle, enabled)
    print(f"agent {_agent_view(agent, settings)['address']} {'enabled' if enabled else 'disabled'}")
    return 0


async def cmd_agent_disable(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    return await _set_enabled(db, settings, args, False)


async def cmd_agent_enable(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    return await _set_enabled(db, settings, args, True)


async def cmd_inbox(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    slug, handle = mailbox_of(args.address, settings)
    agent = await directory.get_agent(db, slug, handle)
    threads = await inbox.agent_inbox(db, agent, limit=args.limit)
    emit(threads, args.json, _inbox_lines)
    return 0


def _inbox_lines(threads: list[dict[str, Any]]) -> list[str]:
    if not threads:
        return ["no mail"]
    lines = []
    for thread in threads:
        lines.append(f"thread {thread['id']}: {thread['subject'] or '(no subject)'}  "
                     f"[{thread['message_count']} message(s), last {thread['last_message_at']:%Y-%m-%d %H:%M}]")
        for message in thread["messages"]:
            when = message["sent_at"] or message["received_at"]
            verdicts = " ".join(f"{key}={message[key]}" for key in
                                ("spf", "dkim", "dmarc", "arc", "scan_status", "spam_status")
                                if message[key])
            if message["spam_score"] is not None:
                verdicts += f" spam={message['spam_score']:.2f} ({message['spam_action']})"
            flags = (" QUARANTINED" if message["quarantined"] else "") + \
                (" SPAM" if message["spam"] else "") + \
                (" (released)" if message["released_at"] else "")
            lines.append(f"  {message['direction']:<8} #{message['id']} {when:%Y-%m-%d %H:%M} "
                         f"from {message['from_header'] or message['mail_from'] or '<>'}")
            lines.append(f"           subject: {message['subject'] or '(no subject)'}  "
                         f"size: {message['size']} bytes{flags}")
            if message["preview"]:
                lines.append(f"           preview: {message['preview']}")
            if verdicts:
                lines.append(f"           verdicts: {verdicts}")
            if message["spam_symbols"]:
                lines.append("           symbols: " + ", ".join(
                    f"{name}({score:g})" for name, score in message["spam_symbols"].items()))
            for attachment in message["attachments"]:
                lines.append(f"           attachment: {attachment['filename'] or '(unnamed)'} "
                             f"({attachment['content_type']}, {attachment['size']} bytes)")
    return lines


async def cmd_quarantine_list(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    rows = await quarantine.held(db, args.workspace, args.limit)
    emit(rows, args.json, lambda held: [
        f"#{m['id']:<8} {m['received_at']:%Y-%m-%d %H:%M} {m['workspace']}/{m['agent']:<16} "
        f"from {m['mail_from'] or '<>'}  subject: {m['subject'] or '(no subject)'}\n"
        f"          held: {m['reason']}" for m in held] or ["nothing held"])
    return 0


async def cmd_quarantine_release(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    released = await quarantine.release(db, args.message_id, args.workspace)
    job = (f"agent job {released.job_id} queued" if released.job_id is not None
           else "no agent job (auto-reply off, or its job already ran)")
    print(f"message {released.message_id} released to {released.workspace}/{released.agent} "
          f"(was held: {released.reason}); {job}")
    return 0


# Each group adds its subcommands to the parser; a command sets `handler` (run with an open
# database pool) or `run` (given the settings, manages its own resources).
COMMAND_GROUPS: list[Callable[[Any, Parents], None]] = [
    register_core,
    register_agent,
    register_domains,
    register_apikeys,
    register_outbound,
    register_acl,
    register_drafts,
    register_mcp,
]
