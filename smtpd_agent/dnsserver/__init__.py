"""The authoritative DNS server for delegated zones (issue 11).

A customer delegates a subdomain (`mail.acme.com NS ns1.<default domain>`) and
from then on every record of it comes from here, read from Postgres: SOA, NS,
MX, SPF, DMARC, DKIM, the Mail-From subdomain, MTA-STS and TLS-RPT (SOA and NS
only until `domain check` verified the domain). It sits
beside the mail pipeline, not in it: `serve` runs it as one more service when
`dns_server.listen` is set, `smtpd-agent dns-serve` runs it alone.

zone.py builds zones and answers queries (pure, tested by tables);
server.py owns the sockets, the per-source limits (UDP rate, TCP slots) and the
zone cache (changes pushed from Postgres, the last good copy served while it fails).
dnspython does the wire format; no packet is parsed by hand.
"""
