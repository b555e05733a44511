"""`smtpd-agent dns-records` and `smtpd-agent domain add|check|list|remove`.

Registered into cli.COMMAND_GROUPS. Output is a zone-file snippet (or one line
per record for `check`), or JSON with --json; the JSON of `dns-records` and
`domain add` follows `records.schema.json`. No output ever carries a private
key: commands only see `DkimKey`, the public side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ..cli_common import Parents
from ..config import Settings
from ..store import domains as store
from . import Domains
from .check import CheckReport, DomainChecker


def register_domains(commands: Any, parents: Parents) -> None:
    common, listing = parents.common, parents.listing
    records = commands.add_parser(
        "dns-records", parents=[common, listing],
        help="the DNS records the operator publishes for the default domain")
    records.add_argument("--check", action="store_true",
                         help="resolve each record instead: what is published, what is missing")
    records.set_defaults(handler=cmd_dns_records)

    domain = commands.add_parser("domain", help="custom domains of workspaces")
    actions = domain.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=[common, listing],
                             help="register a domain (pending) and print its records")
    add.add_argument("domain", help="the domain, e.g. mail.acme.com")
    add.add_argument("--workspace", required=True, metavar="SLUG")
    add.add_argument("--delegate", action="store_true",
                     help="the domain is delegated to our name servers: print the NS (and "
                          "glue) for the parent zone; we serve every other record")
    add.set_defaults(handler=cmd_domain_add)
    rotate = actions.add_parser("rotate-dkim", parents=[common, listing],
                                help="publish new DKIM selectors; sign with them once served, "
                                     "retire the old ones after domains.dkim_rotation_grace")
    rotate.add_argument("domain")
    rotate.set_defaults(handler=cmd_domain_rotate_dkim)
    check = actions.add_parser("check", parents=[common, listing],
                               help="resolve every record; all pass -> verified")
    check.add_argument("domain")
    check.set_defaults(handler=cmd_domain_check)
    listed = actions.add_parser("list", parents=[common, listing], help="list custom domains")
    listed.add_argument("--workspace", metavar="SLUG")
    listed.set_defaults(handler=cmd_domain_list)
    remove = actions.add_parser("remove", parents=[common],
                                help="forget a domain and delete its DKIM keys")
    remove.add_argument("domain")
    remove.set_defaults(handler=cmd_domain_remove)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


async def cmd_dns_records(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    domains = Domains.open(db, settings)
    record_set = await domains.default_record_set()
    if args.check:
        report = await DomainChecker(domains.resolver, settings).check(record_set)
        _print_report(record_set.domain, report, args.json,
                      "all records published" if report.passed else None)
        return 0 if report.passed else 1
    if args.json:
        _print_json(record_set.to_dict())
    else:
        print(record_set.zone_snippet())
    return 0


async def cmd_domain_add(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    record_set = await Domains.open(db, settings).add(args.domain, args.workspace,
                                                      delegate=args.delegate)
    if args.json:
        _print_json(record_set.to_dict())
    else:
        print(record_set.zone_snippet())
    return 0


async def cmd_domain_rotate_dkim(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    domains = Domains.open(db, settings)
    step = await domains.rotate_dkim(args.domain)
    owner, name = await domains.key_owner(step.domain)
    keys = [k for k in await domains.keys.active_keys(owner, name) if k.selector in step.created]
    new = await domains.key_records(owner, name, keys)
    if args.json:
        _print_json({**dataclasses.asdict(step), "records": [r.to_dict() for r in new]})
        return 0
    domain = await store.find_domain(db, name)
    where = "served by our DNS" if domain is not None and domain.delegated else "to publish"
    print(f"{step.domain}: new DKIM selectors {', '.join(step.created)} ({where})")
    for record in new:
        print(record.zone_line())
    if step.activated:
        print(f"  signing with {', '.join(step.activated)} from now on; the old selectors "
              f"stay published {settings.domains.dkim_rotation_grace:.0f}s, then are retired")
    if step.waiting:
        print(f"  not yet served by DNS: {', '.join(step.waiting)}; the old keys keep "
              "signing until they are (`serve` checks every domains.rotation_interval "
              "seconds)")
    return 0


async def cmd_domain_check(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    domain, report = await Domains.open(db, settings).check(args.domain)
    _print_report(domain.name, report, args.json, None, state=domain.state)
    return 0 if report.passed else 1


def _print_report(name: str, report: CheckReport, as_json: bool, passed: str | None,
                  state: str | None = None) -> None:
    if as_json:
        _print_json({"domain": name, "state": state, "passed": report.passed,
                     "records": [c.to_dict() for c in report.checks]})
        return
    for check in report.checks:
        print(check.line())
    verdict = (passed or "all required records pass") if report.passed else (
        "DNS errors, try again later" if report.temperror and not report.failing
        else f"{len(report.failing)} record(s) to fix")
    print(f"{name}: {state} ({verdict})" if state else f"{name}: {verdict}")


async def cmd_domain_list(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    domains = await store.list_domains(db, args.workspace)
    if args.json:
        _print_json([{"domain": d.name, "workspace": d.workspace_slug, "state": d.state,
                      "mail_from": d.mail_from, "verified_at": d.verified_at,
                      "checked_at": d.checked_at, "failing": d.failing,
                      "delegated": d.delegated,
                      "created_at": d.created_at} for d in domains])
        return 0
    if not domains:
        print("no domains")
    for d in domains:
        failing = f"  failing: {', '.join(d.failing)}" if d.failing else ""
        delegated = "  delegated" if d.delegated else ""
        print(f"{d.name:<40} {d.workspace_slug:<20} {d.state:<9}{delegated}{failing}")
    return 0


async def cmd_domain_remove(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    domain = await Domains.open(db, settings).remove(args.domain)
    print(f"domain {domain.name} removed from workspace {domain.workspace_slug}; "
          "its DKIM keys are deleted")
    return 0
