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


@dataclass(frozen=True)
class Parents:
    """Argument groups every command shares: `common` (config, state dir, domain), `listing` (--json)."""

    common: argparse.ArgumentParser
    listing: argparse.ArgumentParser


Command = Callable[[Any, Settings, argparse.Namespace], Awaitable[int]]


async def with_database(settings: Settings, command: Command, args: argparse.Namespace) -> int:
    database = await Database.open(settings, run_migrations=getattr(args, "migrate_first", True))
    try:
        return await command(database.pool, settings, args)
    finally:
        await database.close()


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
