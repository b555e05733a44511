"""VERP Return-Path addresses: <prefix>-<token>@<bounce domain>, one token per outbound message.

The token is random (not derived from ids), so a DSN can only name a message
that we sent; it is stored with the delivery and looked up when a bounce
arrives. Lower-case letters and digits only: routing lower-cases addresses and
treats `+` as a tag separator. Reading a token back out of an address is
addresses.token_of's (routing needs it, and must not import outbound mail).
"""

from __future__ import annotations

import secrets

from ..addresses import within

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def new_token(length: int = 24) -> str:
    # 24 characters of 36 symbols: ~124 bits, not guessable
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def verp_address(prefix: str, token: str, bounce_domain: str) -> str:
    return f"{prefix}-{token}@{bounce_domain}"


def bounce_domain(from_domain: str, default_domain: str, default_label: str,
                  custom_mail_from: str | None) -> str:
    """Where bounces for mail From `from_domain` go: bounce.<default> or the custom Mail-From.

    `<slug>.<default domain>` shares `bounce.<default domain>` (the operator's
    records publish MX and SPF there once); a custom domain has its own
    Mail-From subdomain (`domains.mail_from`), so SPF aligns with its From.
    """
    if within(from_domain, default_domain):
        return f"{default_label}.{default_domain}"
    if custom_mail_from:
        return custom_mail_from
    return f"{default_label}.{default_domain}"
