"""ARC chains over real DNS: a sealed chain passes, tampering fails, no chain is none."""

from __future__ import annotations

import dkim


from .checks import verify_arc
from .keys import message


def arc_sealed(raw: bytes, key, domain: str = "lists.example.org") -> bytes:
    # A forwarder records its own verdict, then seals (RFC 8617 section 5.1).
    raw = (f"Authentication-Results: {domain}; spf=pass smtp.mailfrom=a@example.com\r\n"
           ).encode() + raw
    headers = dkim.arc_sign(raw, b"arc", domain.encode(), key.private, domain.encode(),
                            include_headers=[b"from", b"to", b"subject", b"date"])
    return b"".join(headers) + raw


async def test_no_chain_is_none(resolver):
    assert (await verify_arc(resolver, message())).result == "none"


async def test_sealed_chain_passes(dns_server, resolver, rsa2048):
    dns_server.txt("arc._domainkey.lists.example.org", rsa2048.record)
    result = await verify_arc(resolver, arc_sealed(message(), rsa2048))
    assert (result.result, result.instances) == ("pass", 1)


async def test_tampered_chain_fails(dns_server, resolver, rsa2048):
    dns_server.txt("arc._domainkey.lists.example.org", rsa2048.record)
    raw = arc_sealed(message(), rsa2048).replace(b"Subject: hello", b"Subject: changed")
    assert (await verify_arc(resolver, raw)).result == "fail"


async def test_key_timeout_is_temperror(dns_server, resolver, rsa2048):
    dns_server.set_timeout("arc._domainkey.lists.example.org")
    assert (await verify_arc(resolver, arc_sealed(message(), rsa2048))).result == "temperror"


async def test_more_than_50_sets_fail_without_a_lookup(dns_server, resolver):
    """RFC 8617 4.2.1 caps i= at 50; dkimpy has no cap and rescans all headers per set."""
    seal = b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x.example; s=arc; b=AAAA\r\n"
    result = await verify_arc(resolver, seal * 5000 + message())
    assert result.result == "fail" and "50" in result.reason
    assert dns_server.queries == []
