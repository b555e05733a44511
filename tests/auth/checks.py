"""One check at a time through auth/runner.py, for tests (the stage runs all three at once)."""

from __future__ import annotations

from typing import Callable

from smtpd_agent.auth import arc, dkim, spf
from smtpd_agent.auth.runner import CheckRunner, own_runner
from smtpd_agent.dns import Resolver


def _never(domain: str) -> bool:
    return False


async def verify_dkim(resolver: Resolver, message: bytes, runner: CheckRunner | None = None,
                      *, first: Callable[[str], bool] = _never,
                      limit: int = dkim.DEFAULT_MAX_SIGNATURES,
                      deadline: float = 20.0) -> dkim.DkimResult:
    async with own_runner(runner) as checks:
        result = await checks.run(resolver, dkim.dkim_check(message, first=first, limit=limit),
                                  deadline)
    return result if result is not None else dkim.timed_out(message, first=first, limit=limit)


async def verify_arc(resolver: Resolver, message: bytes, runner: CheckRunner | None = None,
                     *, deadline: float = 20.0) -> arc.ArcResult:
    async with own_runner(runner) as checks:
        result = await checks.run(resolver, arc.arc_check(message), deadline)
    return result if result is not None else arc.timed_out()


async def check_spf(resolver: Resolver, client_ip: str, mail_from: str, helo: str, *,
                    timeout: float = spf.DEFAULT_SPF_TIMEOUT,
                    default_explanation: str | None = None,
                    runner: CheckRunner | None = None) -> spf.SpfResult:
    async with own_runner(runner) as checks:
        result = await checks.run(resolver, spf.spf_check(
            client_ip, mail_from, helo, timeout=timeout,
            default_explanation=default_explanation), timeout)
    return result if result is not None else spf.timed_out(client_ip, mail_from, helo)
