"""What DNS must say for a domain to receive and send through us: pure record sets.

Two sets, both built from settings and keys without any I/O:

- the operator's default domain (`smtpd-agent dns-records`): wildcard MX so
  every `<workspace>.<default domain>` reaches us, SPF for the domain and the
  wildcard (both include `_spf.<default domain>`, the one list of our sending
  hosts), DMARC, the bounce subdomain's MX and SPF, the default domain's DKIM
  keys;
- a custom domain (`smtpd-agent domain add`): two MX, SPF, the Mail-From
  subdomain's MX and SPF, DKIM (TXT, or CNAMEs into the operator's hosted
  zone), DMARC and the ownership TXT.

`domain check` (check.py) resolves exactly these records, so what we print and
what we verify cannot drift apart; those the customer publishes decide
verification. Rendered as a zone-file snippet or as JSON (schema:
`smtpd_agent/domains/records.schema.json`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from ..addresses import within
from ..config import Settings
from .hosts import mx_hosts
from .keys import DkimKey
from .mta_sts import policy_for, policy_host, proxy_host, sts_txt, tlsrpt_txt

RecordType = Literal["MX", "TXT", "CNAME", "NS", "A", "AAAA"]
Purpose = Literal["mx", "spf", "spf-hosts", "mail-from-mx", "mail-from-spf", "dkim", "dmarc",
                  "dmarc-report-authorization", "ownership", "delegation", "glue", "mta-sts",
                  "mta-sts-host", "tls-rpt"]
TTL = 3600
OWNERSHIP_LABEL = "_smtpd-agent"
OWNERSHIP_PREFIX = "smtpd-agent-verification="
TXT_CHUNK = 255  # RFC 1035 3.3.14: one character-string holds at most 255 octets


@dataclass(frozen=True)
class DnsRecord:
    """One record to publish. `value` is the MX host, TXT text or CNAME target."""

    name: str
    type: RecordType
    value: str
    purpose: Purpose
    priority: int | None = None  # MX only
    publisher: Literal["customer", "operator"] = "customer"
    required: bool = True
    ttl: int = TTL

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.priority is None:
            del data["priority"]
        return data

    def zone_line(self) -> str:
        """RFC 1035 5.1 master-file form, absolute names; long TXT split into 255-octet strings."""
        if self.type == "MX":
            rdata = f"{self.priority} {self.value}."
        elif self.type in ("A", "AAAA"):
            rdata = self.value
        elif self.type in ("CNAME", "NS"):
            rdata = f"{self.value}."
        else:
            chunks = [self.value[i:i + TXT_CHUNK] for i in range(0, len(self.value), TXT_CHUNK)]
            quoted = ['"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks]
            rdata = quoted[0] if len(quoted) == 1 else "( " + " ".join(quoted) + " )"
        return f"{self.name}.\t{self.ttl}\tIN\t{self.type}\t{rdata}"


@dataclass(frozen=True)
class RecordSet:
    domain: str
    kind: Literal["default", "custom"]
    records: tuple[DnsRecord, ...]
    workspace: str | None = None
    state: str | None = None
    delegated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "kind": self.kind, "workspace": self.workspace,
                "state": self.state, "delegated": self.delegated,
                "records": [r.to_dict() for r in self.records]}

    def zone_snippet(self) -> str:
        heading = {
            "default": f"; Records for the default domain {self.domain}: publish them in its zone.",
            "custom": f"; Records for {self.domain} (workspace {self.workspace}): publish them, "
                      f"then run `smtpd-agent domain check {self.domain}`.",
        }[self.kind]
        if self.delegated:
            heading = (f"; {self.domain} (workspace {self.workspace}) is delegated to us: publish "
                       f"these records in the parent zone, then run "
                       f"`smtpd-agent domain check {self.domain}`. We serve every other record.")
        lines = [heading]
        for publisher in ("customer", "operator"):
            records = [r for r in self.records if r.publisher == publisher]
            if not records:
                continue
            if publisher == "operator" and self.kind == "custom":
                lines.append("; Served by the operator (hosted DKIM zone), not by the customer:")
            last = None
            for record in records:
                if record.purpose != last:
                    lines.append(f"; {PURPOSE_TEXT[record.purpose]}")
                    last = record.purpose
                lines.append(record.zone_line())
        return "\n".join(lines)


PURPOSE_TEXT: dict[str, str] = {
    "mx": "MX: mail for the domain comes to us (primary and backup)",
    "spf": "SPF: our sending hosts may use the domain",
    "spf-hosts": "SPF: the one list of our sending hosts, included by every domain",
    "mail-from-mx": "Mail-From (bounce) subdomain: bounces come back to us",
    "mail-from-spf": "Mail-From (bounce) subdomain: SPF for the envelope sender",
    "dkim": "DKIM public keys (RSA-2048 and Ed25519)",
    "dmarc": "DMARC policy",
    "dmarc-report-authorization": "DMARC reports for other domains may come to us (RFC 7489 7.1)",
    "ownership": "Ownership: proves the domain's owner asked for this",
    "delegation": "NS: delegate the domain to our name servers (in the parent zone)",
    "glue": "Glue: addresses of name servers named inside the delegated domain",
    "mta-sts": "MTA-STS (RFC 8461): senders must use TLS; the id changes with the policy",
    "mta-sts-host": "MTA-STS policy host: https://mta-sts.<domain>/.well-known/mta-sts.txt",
    "tls-rpt": "TLS-RPT (RFC 8460): where senders report TLS failures",
}


def spf_hosts_name(settings: Settings) -> str:
    return f"_spf.{settings.server.default_domain}"


def spf_record(settings: Settings) -> str:
    """What every domain of ours publishes: our hosts and nothing else (-all, RFC 7208 5.1)."""
    return f"v=spf1 include:{spf_hosts_name(settings)} -all"


def spf_hosts_record(settings: Settings) -> str:
    mechanisms = settings.domains.spf_mechanisms or [f"a:{host}" for host in mx_hosts(settings)]
    return "v=spf1 " + " ".join(mechanisms) + " -all"


def dmarc_record(settings: Settings, subdomain_policy: bool = False) -> str:
    policy = settings.domains.dmarc_policy
    tags = ["v=DMARC1", f"p={policy}"]
    if subdomain_policy:
        tags.append(f"sp={policy}")
    if settings.domains.dmarc_rua:
        tags.append("rua=" + ",".join(u.strip() for u in settings.domains.dmarc_rua.split(",")))
    return "; ".join(tags)


def mail_from_domain(domain: str, settings: Settings) -> str:
    if domain == settings.server.default_domain:
        return f"{settings.domains.default_mail_from_label}.{domain}"
    return f"{settings.domains.mail_from_label}.{domain}"


def ownership_name(domain: str) -> str:
    return f"{OWNERSHIP_LABEL}.{domain}"


def parent_ownership_name(domain: str) -> str:
    """Where a delegated domain's ownership record lives: in its parent zone.

    `_smtpd-agent.<domain>` lies below the zone cut, so resolvers would ask us for it;
    the proof must come from whoever controls the parent (the one who delegates), or a
    stale delegation left by a removed domain, or the first workspace to claim a name,
    would verify itself. `mail.acme.com` -> `_smtpd-agent.acme.com` (one TXT per
    delegated subdomain: each carries its own token).
    """
    return ownership_name(domain.partition(".")[2])


def hosted_dkim_name(key: DkimKey, zone: str) -> str:
    """Where the operator serves a customer's key when it hosts them: under its own zone."""
    return f"{key.name}.{zone}"


def nameservers(settings: Settings) -> list[str]:
    """Our name servers: the NS set of every delegated zone."""
    domain = settings.server.default_domain
    return list(settings.dns_server.nameservers) or [f"ns1.{domain}", f"ns2.{domain}"]


def glue_addresses(settings: Settings) -> dict[str, list[str]]:
    addresses: dict[str, list[str]] = {}
    for entry in settings.dns_server.glue:
        host, _, address = entry.partition("=")
        addresses.setdefault(host.strip().lower(), []).append(address.strip())
    return addresses


def delegation_records(settings: Settings, domain: str) -> list[DnsRecord]:
    """What the parent zone publishes: NS to our servers, and glue for in-zone server names
    (RFC 1034 4.2.1: without it a resolver could not reach them)."""
    records = [DnsRecord(domain, "NS", ns, "delegation") for ns in nameservers(settings)]
    glue = glue_addresses(settings)
    for ns in nameservers(settings):
        if within(ns, domain):
            for address in glue.get(ns, []):
                records.append(DnsRecord(ns, "AAAA" if ":" in address else "A", address, "glue"))
    return records


def mta_sts_records(settings: Settings, domain: str) -> list[DnsRecord]:
    """_mta-sts TXT, the policy host and _smtp._tls TXT; not required for verification (mail
    flows without them), shown and checked so the customer can see what is missing."""
    return [
        DnsRecord(f"_mta-sts.{domain}", "TXT", sts_txt(policy_for(settings)), "mta-sts",
                  required=False),
        DnsRecord(policy_host(domain), "CNAME", proxy_host(settings), "mta-sts-host",
                  required=False),
        DnsRecord(f"_smtp._tls.{domain}", "TXT", tlsrpt_txt(settings), "tls-rpt",
                  required=False),
    ]


def delegated_zone_records(settings: Settings, domain: str,
                           keys: list[DkimKey]) -> tuple[DnsRecord, ...]:
    """Every record our DNS server serves for a delegated zone, except the SOA.

    The same builders as the self-managed set, so the two cannot drift apart; the DKIM keys
    are TXT records in the zone itself (no hosted-zone CNAMEs: the zone is ours already).
    """
    mail_from = mail_from_domain(domain, settings)
    glue = glue_addresses(settings)
    served = [
        *[DnsRecord(domain, "NS", ns, "delegation") for ns in nameservers(settings)],
        *[DnsRecord(ns, "AAAA" if ":" in a else "A", a, "glue")
          for ns in nameservers(settings) if within(ns, domain) for a in glue.get(ns, [])],
        *_mx(domain, settings, "mx"),
        DnsRecord(domain, "TXT", spf_record(settings), "spf"),
        *_mx(mail_from, settings, "mail-from-mx"),
        DnsRecord(mail_from, "TXT", spf_record(settings), "mail-from-spf"),
        *[DnsRecord(k.name, "TXT", k.txt, "dkim") for k in keys],
        DnsRecord(f"_dmarc.{domain}", "TXT", dmarc_record(settings), "dmarc"),
        *mta_sts_records(settings, domain),
    ]
    return tuple(replace(r, ttl=settings.dns_server.ttl) for r in served)


def _mx(name: str, settings: Settings, purpose: Purpose) -> list[DnsRecord]:
    primary, backup = mx_hosts(settings)
    return [DnsRecord(name, "MX", primary, purpose, priority=10),
            DnsRecord(name, "MX", backup, purpose, priority=20)]


def default_domain_records(settings: Settings, keys: list[DkimKey]) -> RecordSet:
    domain = settings.server.default_domain
    bounce = mail_from_domain(domain, settings)
    records = [
        *_mx(f"*.{domain}", settings, "mx"),
        DnsRecord(spf_hosts_name(settings), "TXT", spf_hosts_record(settings), "spf-hosts"),
        DnsRecord(domain, "TXT", spf_record(settings), "spf"),
        DnsRecord(f"*.{domain}", "TXT", spf_record(settings), "spf"),
        *_mx(bounce, settings, "mail-from-mx"),
        DnsRecord(bounce, "TXT", spf_record(settings), "mail-from-spf"),
        *[DnsRecord(k.name, "TXT", k.txt, "dkim") for k in keys],
        DnsRecord(f"_dmarc.{domain}", "TXT", dmarc_record(settings, subdomain_policy=True),
                  "dmarc"),
    ]
    rua_domains = {uri.strip().rpartition("@")[2].lower()
                   for uri in settings.domains.dmarc_rua.split(",") if uri.strip()}
    if domain in rua_domains:
        records.append(DnsRecord(f"*._report._dmarc.{domain}", "TXT", "v=DMARC1",
                                 "dmarc-report-authorization"))
    return RecordSet(domain, "default", tuple(records))


def custom_domain_records(settings: Settings, domain: str, workspace: str, state: str,
                          token: str, keys: list[DkimKey]) -> RecordSet:
    mail_from = mail_from_domain(domain, settings)
    zone = settings.domains.dkim_hosted_zone
    dkim: list[DnsRecord] = []
    for key in keys:
        if zone:
            target = hosted_dkim_name(key, zone)
            dkim.append(DnsRecord(key.name, "CNAME", target, "dkim"))
            dkim.append(DnsRecord(target, "TXT", key.txt, "dkim", publisher="operator",
                                  required=False))
        else:
            dkim.append(DnsRecord(key.name, "TXT", key.txt, "dkim"))
    records = [
        *_mx(domain, settings, "mx"),
        DnsRecord(domain, "TXT", spf_record(settings), "spf"),
        *_mx(mail_from, settings, "mail-from-mx"),
        DnsRecord(mail_from, "TXT", spf_record(settings), "mail-from-spf"),
        *[r for r in dkim if r.publisher == "customer"],
        DnsRecord(f"_dmarc.{domain}", "TXT", dmarc_record(settings), "dmarc"),
        DnsRecord(ownership_name(domain), "TXT", OWNERSHIP_PREFIX + token, "ownership"),
        *mta_sts_records(settings, domain),
        *[r for r in dkim if r.publisher == "operator"],
    ]
    return RecordSet(domain, "custom", tuple(records), workspace=workspace, state=state)


def delegated_domain_records(settings: Settings, domain: str, workspace: str,
                             state: str, token: str) -> RecordSet:
    """`domain add --delegate`: only what the parent zone publishes, the delegation and the
    ownership record; we serve the rest (once verified: before, only SOA and NS)."""
    records = [*delegation_records(settings, domain),
               DnsRecord(parent_ownership_name(domain), "TXT", OWNERSHIP_PREFIX + token,
                         "ownership")]
    return RecordSet(domain, "custom", tuple(records), workspace=workspace, state=state,
                     delegated=True)
