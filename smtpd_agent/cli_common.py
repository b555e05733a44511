"""What every command group shares: the common argument groups, JSON/text output, and
running a handler with an open database.

The sub-CLIs (agent/cli.py, domains/cli.py, outbound/cli.py, http/cli.py) import this
module; cli.py composes them. Nothing here imports a command group, so no group needs
to import cli.py back.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import Settings
from .runtime import Database
from .store import deployment


@dataclass(frozen=True)
class Parents:
    """Argument groups every command shares: `common` (config, state dir, domain), `listing` (--json)."""

    common: argparse.ArgumentParser
    listing: argparse.ArgumentParser


Command = Callable[[Any, Settings, argparse.Namespace], Awaitable[int]]


async def with_database(settings: Settings, command: Command, args: argparse.Namespace) -> int:
    """Run `command` with an open pool and the deployment's identity (deployment_settings);
    `migrate` (migrate_first False) and the `deployment` commands deal with it themselves."""
    migrate_first = getattr(args, "migrate_first", True)
    database = await Database.open(settings, run_migrations=migrate_first)
    try:
        if migrate_first and getattr(args, "identity_check", True):
            settings = await deployment_settings(database.pool, settings, args)
        return await command(database.pool, settings, args)
    finally:
        await database.close()


async def deployment_settings(db: Any, settings: Settings, args: argparse.Namespace) -> Settings:
    """The settings a command runs with: the default domain the database records (the one
    `serve` or `migrate` recorded), not the file's or the built-in one. A --default-domain
    that differs is refused with both values named; none recorded yet: ours."""
    identity = await deployment.recorded(db)
    if identity is None:
        return settings
    given = getattr(args, "default_domain", None)
    if given is not None and given != identity.default_domain:
        raise deployment.DeploymentMismatch(identity.default_domain, given,
                                            "this command was given --default-domain")
    if settings.server.default_domain == identity.default_domain:
        return settings
    return settings.replace({"server.default_domain": identity.default_domain})


def emit(data: Any, as_json: bool, lines: Callable[[Any], list[str]]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=_json_default))
    else:
        print("\n".join(lines(data)))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bytes, memoryview)):
        return bytes(value).hex()
    if isinstance(value, Path):
        return str(value)
    return str(value)
