"""Our MX host names, from settings: what every record set (records.py) and the MTA-STS
policy (mta_sts.py) point at. A leaf of the domains package, so that those two need not
import each other."""

from __future__ import annotations

from ..config import Settings


def mx_hosts(settings: Settings) -> tuple[str, str]:
    domain = settings.server.default_domain
    return (settings.domains.mx_primary or f"mx1.{domain}",
            settings.domains.mx_backup or f"mx2.{domain}")
